"""The TOML presets. pyproject.toml installs this directory as the package `gpt.configs`, so the presets
travel with any install of gpt (a wheel included) while this stays the one place they are edited."""
