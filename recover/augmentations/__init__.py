"""Built-in augmentations; every module here is imported by :mod:`recover.builtins`."""
