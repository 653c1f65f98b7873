"""`ossyncd broker`: the fleet's STS service (docs/broker.md).

Modules: ``config`` (broker.toml), ``registry`` (its own SQLite: clients by token hash,
heartbeats), ``policy`` (a client's inline session policy), ``issuer`` (AssumeRole through
credentials/sts.py, the per-client cache, the rate limits), ``audit`` (one JSON line per
decision), ``metrics`` (its Prometheus registry), ``server`` (the HTTP(S) service), ``cli``
(the `ossyncd broker` commands). Nothing here is imported by the daemon."""
