"""The view of docs/producers.md's Django example: the order and its job commit together."""

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse

import kongtask
from django_demo.orders.models import Order


def place_order(request: HttpRequest) -> JsonResponse:
    number = int(request.POST["number"])
    with transaction.atomic():
        order = Order.objects.create(number=number)
        job = kongtask.add_job_sync(connection, "confirm_order", {"order": order.pk})
        if number < 0:
            raise ValueError("negative order numbers are refused")  # rolls both back
    return JsonResponse({"order": order.pk, "job": job.id})
