"""Settings of the Django demo project the producer tests run (not a test module).

The database comes from ``$KONGTASK_DJANGO_DSN`` (a ``postgresql://`` URL).
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

_url = urlsplit(os.environ["KONGTASK_DJANGO_DSN"])

SECRET_KEY = "kongtask-tests-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["testserver"]
INSTALLED_APPS = ["django_demo.orders"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_demo.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(_url.path.lstrip("/")),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": str(_url.port or ""),
    }
}
