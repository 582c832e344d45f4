"""The top layer of Quorum, in floors; each imports only from floors below it (see ARCHITECTURE.md).

core < security < cluster < replicas < gateway < node < cli
"""
