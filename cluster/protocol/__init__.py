"""The wire: everything that crosses a trust boundary and that clients need too. Canonical JSON,
identities, the signed envelope, the messages, the HTTP error shape, image references and policy,
job specs and views, and the streaming formats (keys, request envelopes, receipts, the whitelist).
Public: ``jobs`` and ``serve_apps`` import from here; it imports nothing of the roles."""
