"""One module per method; each registers its model class with ``@register_model``."""
