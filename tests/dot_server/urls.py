"""DOT's endpoints under /o/: /o/token/ and /o/revoke_token/ are the ones the tests use."""

from django.urls import include, path

urlpatterns = [path("o/", include("oauth2_provider.urls", namespace="oauth2_provider"))]
