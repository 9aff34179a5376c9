"""Shard format: webdataset-compatible tar shards, a JSON index per shard, a dataset manifest.

Layout under a store prefix (local directory or s3://bucket/prefix, see data/store.py):

    manifest.json
    <source>/shard-000000.tar          webdataset tar: members "<key>.<ext>"
    <source>/shard-000000.idx.json     byte-offset index of that tar

Tar shards
----------
Plain ustar archives, readable by the `webdataset` library as ordinary shards. A sample's members
are consecutive and named "<key>.<ext>"; keys contain no dot (webdataset splits at the first dot).
Headers are fixed (mtime 0, uid/gid 0, uname/gname "", mode 0o644), members are written in sorted
order, so the same input gives byte-identical shards. Member extensions by sample kind:

    text         "txt"                         UTF-8 text
    image        "jpg" | "png" | "webp", "txt" image bytes as ingested, caption
    video        "mp4", "txt"                  video bytes as ingested, caption
    interleaved  "json", "img0.jpg", "img1.png", ...
                 json = {"segments": [{"text": "..."} | {"image": "img0.jpg"}, ...]}, in reading
                 order; "image" names another member of the same sample.

Index (<shard>.idx.json)
------------------------
{
  "format": "mmpt-index/1",
  "source": "text",                      # source name (manifest.sources[].name)
  "shard": "text/shard-000000.tar",      # store key of the tar, relative to the dataset prefix
  "size": 123456,                        # tar size in bytes
  "samples": [                           # in tar order; sample i of the shard is samples[i]
    {
      "key": "000000000012",             # webdataset __key__
      "kind": "text" | "image" | "video" | "interleaved",
      "members": {                       # ext -> DATA offset/size inside the tar (ranged GET:
        "txt": {"offset": 1536, "size": 812}   #   bytes [offset, offset + size))
      },
      "text_tokens": 187,                # tokens of all text (text, caption, or text segments)
                                         # under the dataset tokenizer, no special tokens added
      "text_bytes": 812,                 # UTF-8 bytes of that text
      "images": [                        # image and interleaved samples, in reading order
        {"member": "jpg", "height": 512, "width": 384}   # size AFTER EXIF orientation
      ],
      "videos": [                        # video samples
        {"member": "mp4", "frames": 90, "height": 240, "width": 320, "fps": 30.0}
      ]
    }
  ]
}
"images"/"videos" are present (possibly empty) for every sample, so vision token counts can be
computed from the index alone (data.vision.vision_tokens_from_meta) without decoding.

Manifest (manifest.json)
------------------------
{
  "format": "mmpt-manifest/1",
  "sources": [{"name": "text", "kind": "text", "num_samples": 5000, "num_shards": 3}, ...],
  "shards": [                            # sources in manifest order, shards in order within a source
    {"source": "text", "key": "text/shard-000000.tar", "index": "text/shard-000000.idx.json",
     "num_samples": 2000, "size": 123456, "index_sha256": "..."}
  ],
  "tokenizer": {"fingerprint": "<sha256>", "vocab_size": 2048, "special_tokens": {"<|pad|>": 0, ...}},
  "fingerprint": "<sha256>",             # sha256 over the index files' sha256 in shard order and the
                                         # tokenizer fingerprint: identifies the dataset's content
  "skipped": {"count": 2, "inputs": [{"path": "...", "reason": "..."}]},
  "num_samples": 5123
}

A sample is identified by (source, shard number within the source, sample number within the shard).
Keys in the manifest/index are relative to the dataset prefix (the directory holding manifest.json).
"""
