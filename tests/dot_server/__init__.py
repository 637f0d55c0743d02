"""A django-oauth-toolkit authorization server for tests/test_interop_dot.py.

Run as its own process (``python -m django runserver``) with ``PYTHONPATH`` holding ``tests``
and ``DJANGO_SETTINGS_MODULE=dot_server.settings``; every knob comes from the environment (see
settings.py), so one module serves all the combinations the interop tests need.
"""
