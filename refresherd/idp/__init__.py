"""The IdP's side: everything refresherd sends to an OAuth 2.0 identity provider and reads back.

In the order a request goes out and its answer comes in:

- :mod:`refresherd.idp.endpoint`: ``TokenEndpoint``, a provider's token endpoint: refresh,
  authorization-code exchange, RFC 7009 revocation; the client's authentication; an answer
  classified into a grant or one typed failure.
- :mod:`refresherd.idp.transport`: the HTTP under it: one aiohttp session (a pool of
  ``max_connections``) per provider, the deadlines, the body limit, and where a request that
  failed stopped (never sent, or sent and the outcome unknown).
- :mod:`refresherd.idp.failures`: the typed failures (``NotSent``, ``Ambiguous``, ...).
- :mod:`refresherd.idp.token_response`: the rules for reading a token response (RFC 6749 5.1,
  5.2), once: the endpoint applies them to an IdP's answer, :mod:`refresherd.intake` to a token
  response handed in from outside.
- :mod:`refresherd.idp.discovery`: OpenID Connect Discovery, an issuer's endpoints.

Nothing is imported here: ``tokens import`` reads token responses without loading aiohttp.
"""
