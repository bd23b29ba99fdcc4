"""The fedkb aggregation server: rounds, validation, streaming weighted FedAvg, publishing.

Build it with `aggregator.app.create_app(config)`; run it with `fedkb serve`. Pure logic lives in
`fedavg` (the maths) and `rounds` (the lifecycle policy); `db`, `folding` and `publish` do the
I/O; `routes/` turns HTTP into calls to them.
"""
