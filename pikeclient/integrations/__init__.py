"""Other projects running on pikeclient. Each module here imports pikeclient (and its project); pikeclient
never imports them: ``pikeclient.integrations.pikerag`` makes pikeclient a client of PIKE-RAG's workflows."""
