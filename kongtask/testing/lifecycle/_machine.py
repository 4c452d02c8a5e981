"""The lifecycle machine put together, and how to bind and run it."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, seed as hypothesis_seed, settings
from hypothesis.stateful import run_state_machine_as_test

from ._harness import LifecycleHarness
from ._protocol_rules import ClaimRules, PoolRules
from ._sql_rules import SqlApiRules


class LifecycleMachine(SqlApiRules, ClaimRules, PoolRules):
    """The rules and invariants; bind it to a harness with :func:`lifecycle_machine`.

    Each rule is one step: one round of statements on the database, the model's
    transition, then every invariant. Subclass it to add rules; ``self.model`` is the
    prediction and ``self.harness`` the shared connections.
    """

    def teardown(self) -> None:
        """Nothing: the next example resets the rows."""


def lifecycle_machine(
    harness: LifecycleHarness, base: type[LifecycleMachine] = LifecycleMachine
) -> type[LifecycleMachine]:
    """A machine class bound to ``harness`` (hypothesis makes one instance per example).

    Args:
      harness: from :func:`open_lifecycle_harness`.
      base: :class:`LifecycleMachine` or a subclass with more rules.
    """
    return type(f"{base.__name__}On_{harness.schema}", (base,), {"harness": harness})


def lifecycle_settings(
    examples: int, *, steps: int = 30, shrink: bool = True, derandomize: bool = False
) -> settings:
    """Hypothesis settings for the machine: no deadline, no example database.

    Args:
      examples: ``max_examples``.
      steps: ``stateful_step_count``, the most steps per example.
      shrink: shrink a failure to a short counterexample (``False``: report it as found).
      derandomize: derive the examples from the test itself instead of a random seed.
    """
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if shrink:
        phases.append(Phase.shrink)
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=derandomize,
        report_multiple_bugs=False,
        print_blob=False,
        # no explain phase: it re-runs a failure many times to annotate lines (slow here)
        phases=phases,
        # too_slow: every step is a round trip to a real server, so data generation
        # legitimately takes longer than hypothesis expects; the other checks stay on
        suppress_health_check=[HealthCheck.too_slow],
    )


def run_lifecycle_machine(
    harness: LifecycleHarness,
    *,
    examples: int = 100,
    steps: int = 30,
    seed: int | None = None,
    base: type[LifecycleMachine] = LifecycleMachine,
    settings_: settings | None = None,
) -> None:
    """Run the machine for ``examples`` examples; raise the (shrunk) first violation.

    Args:
      harness: from :func:`open_lifecycle_harness`.
      examples: hypothesis ``max_examples``.
      steps: at most this many steps per example.
      seed: fix the random seed (CI); ``None`` draws a fresh one.
      base: the machine class to bind (a subclass may add rules).
      settings_: full hypothesis settings, overriding ``examples`` and ``steps``.

    Raises:
      InvariantViolation: an invariant failed; hypothesis has printed the steps.
    """
    machine = lifecycle_machine(harness, base)
    if seed is not None:
        machine = hypothesis_seed(seed)(machine)
    run_state_machine_as_test(
        machine, settings=settings_ or lifecycle_settings(examples, steps=steps)
    )
