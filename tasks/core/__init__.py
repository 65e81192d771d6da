"""The core every phase stands on: the run spec, the typed objects passed between stages,
errors, money, atomic writes, the run folder and its locks, fault sorting, the method table,
where a model comes from, and access to the Hub. Imports nothing above itself."""
