from django.urls import path

from django_demo.orders.views import place_order

urlpatterns = [path("orders/", place_order)]
