"""DOT's endpoints under /o/ (/o/token/, /o/revoke_token/, /o/authorize/ and, with DOT_OIDC,
/o/.well-known/openid-configuration), and Django's login page for its authorization view."""

from django.contrib.auth.views import LoginView
from django.urls import include, path

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("accounts/login/", LoginView.as_view(template_name="dot_server/login.html")),
]
