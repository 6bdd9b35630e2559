"""The ground floor every stage shares: errors, atomic IO, runtime, config machinery, the registry, data sources,
pure partition/seeding logic and the distilled-set format. It imports nothing else of the project."""
