"""The cache as a deterministic state machine: commands and their log encoding
(`commands`), and applying them (`statemachine`: versions, TTLs, exactly-once sessions,
replicated settings, snapshots). Every replica applies the same entries to the same result."""
