"""Every configuration key of cimd_jax at its default value.

The keys and defaults are the fields of the typed argument dataclasses, one per
group (`cimd_jax/settings.py` lists them: data, model, diffusion, objective,
training, sampling); each field's docstring says what it does and its check says
what it accepts. Other config files start from `settings.default_config()` and
change what differs.
"""

from cimd_jax import settings


def get_config():
  return settings.default_config()
