"""`make reliability`: the reliability scenarios against the real server, one module each
(overload, faults, drain, disconnects, soak, slow_clients, inputs), on shared pieces: results
(verdicts), options, servers (start/stop), metrics (/metrics and RSS), load (the POST-and-record
step and closed loops), open_loop (the fixed-rate generator), runner (names and time bounds),
report (markdown/JSON/tables) and cli (`python -m loadtest.reliability`)."""
