"""``kscope forget``: erase records from a model you own and hand over an audit (records, run, audit, page, state)."""
