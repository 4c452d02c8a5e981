from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "django_demo.orders"
