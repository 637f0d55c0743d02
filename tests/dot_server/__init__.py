"""A django-oauth-toolkit authorization server for tests/test_interop_dot.py and
tests/test_connect_browser.py.

Run as its own process (``python -m django runserver``) with ``PYTHONPATH`` holding ``tests``
and ``DJANGO_SETTINGS_MODULE=dot_server.settings``; every knob comes from the environment (see
settings.py), so one module serves all the combinations the tests need. DOT's token,
revocation and authorization endpoints (with Django's login page and DOT's consent page) are
DOT's own; the one piece an IdP has that DOT lacks, ``response_mode=form_post``, is ours
(apps.FormPostMiddleware).
"""
