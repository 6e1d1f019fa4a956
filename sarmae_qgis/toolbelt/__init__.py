"""Small helpers shared by the plugin: logging, plugin metadata."""
