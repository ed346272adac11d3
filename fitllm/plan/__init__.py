"""Planning: what a model and its settings will hold in memory, from the config alone (weights counted on
the meta device), and the engine's weight placement by the same rule."""
