"""Names that the server and the clients agree on, beyond Flower's own message layout."""

INITIAL_WEIGHTS_QUERY = "initial-weights"
"""A ``query`` message with ``config["query"]`` set to this asks a node for the seeded initial weights."""
