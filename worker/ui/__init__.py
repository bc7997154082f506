"""The web UI (`webhooks ui`) and the partner portal: server-rendered pages over the same
database the worker writes, in a process of their own."""
