"""Built-in objectives; every module here is imported by :mod:`recover.builtins`."""
