"""GPU worker: model loading, generation, memory hygiene, rendering."""
