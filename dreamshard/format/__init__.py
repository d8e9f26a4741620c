"""The data contract between the engine and every reader (docs/format.md): layout names, the fsspec
`Store` and atomic writes, the sample record, the shard writer and the run reader. Imports neither the
engine nor the trainer."""
