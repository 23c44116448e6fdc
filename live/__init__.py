"""Live acquisition service: config, wire protocol, hook, sources, worker, recorder, daemon."""
