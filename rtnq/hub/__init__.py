"""`rtnq convert ORG/NAME[@REVISION] OUT`: a model on the Hugging Face hub as the source.

    repo.resolve_repo      ORG/NAME[@REV] -> HubRepo: the commit, the files (sizes, LFS sha256), the shard list
    headers.remote_specs   the TensorSpecs from ranged reads of each shard's header (a dry run downloads no weight)
    headers.fetch_small_files  config.json, the index, tokenizer files: through the client's cache into a directory
    staging.Staging        shards downloaded one ahead of the converter into a directory, verified, deleted when done

Everything goes through the real `huggingface_hub` client (its session, token lookup, cache layout, offline mode
and error classes); `client` turns its exceptions into rtnq's one-line typed errors. The client and the network
are imported only here, lazily from the converter's point of view: a local conversion never loads them.
"""
