"""A deliberately naive, line-by-line reading of the packing that prepare.pack_rows documents: rows of
T+1 tokens filled left to right, each time with the longest buffered document that fits whole, else
the first tokens of the shortest, the buffer refilled to buffer_size documents before each placement.

It reads the parquet files itself and tokenizes every document on the fly, keeps the buffer as a
plain list and scans it for every placement. The tests hold prepare.make_dataloader against it,
and benchmarks/bench_loader.py measures how much faster the real loader is.
"""

import pyarrow.parquet as pq


def naive_rows(tokenizer, paths, T, buffer_size):
    """Yield (row as a list of T+1 token ids, epoch) forever."""

    def document_batches():
        epoch = 1
        while True:
            for path in paths:
                pf = pq.ParquetFile(path)
                for rg in range(pf.num_row_groups):
                    texts = pf.read_row_group(rg).column("text").to_pylist()
                    for start in range(0, len(texts), 128):
                        bos = tokenizer.get_bos_token_id()
                        yield [tokenizer.encode(t, prepend=bos) for t in texts[start : start + 128]], epoch
            epoch += 1

    source = document_batches()
    buffer, epoch = [], 1
    while True:
        row = []
        while len(row) < T + 1:
            while len(buffer) < buffer_size:
                docs, epoch = next(source)
                buffer.extend(docs)
            room = T + 1 - len(row)
            best = None
            for i, doc in enumerate(buffer):  # the longest that fits whole, earliest among equals
                if len(doc) <= room and (best is None or len(doc) > len(buffer[best])):
                    best = i
            if best is not None:
                row.extend(buffer.pop(best))
            else:  # none fits: the shortest, earliest among equals, cut to the room left
                shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row.extend(buffer.pop(shortest)[:room])
        yield row, epoch


def naive_batches(tokenizer, paths, B, T, buffer_size):
    """Yield (rows as a B x (T+1) list of lists, epoch of the last row) forever."""
    rows = naive_rows(tokenizer, paths, T, buffer_size)
    while True:
        batch = [next(rows) for _ in range(B)]
        yield [r for r, _ in batch], batch[-1][1]
