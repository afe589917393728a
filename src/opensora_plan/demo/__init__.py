"""The "shapes" demo world: synthetic captioned videos, and automatic checks of generated ones."""
