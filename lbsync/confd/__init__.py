"""confd → lbsync migration: read confd resources and Go templates, write lbsync."""
