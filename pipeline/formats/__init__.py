"""One home per committed file format: its schema, its writer and its checked reader.

| file | module |
|---|---|
| input and output shards (tar) | :mod:`.tar` (bytes), :mod:`.webdataset` (samples) |
| ``embeddings/part-NNNNN.parquet``, ``embeddings/_skipped/part-NNNNN.parquet`` | :mod:`.embeddings` |
| ``graph/nodes.parquet``, ``graph/part-NNNNN.parquet``, ``graph/lists.parquet`` | :mod:`.graph` |
| ``selection/selected.parquet``, ``selection/subset*.npy``, ``selection/nodes/part-*.parquet`` | :mod:`.selection` |
| ``selection/_work/*.col`` (the select stage's shuffle and merge files) | :mod:`.shuffle` |
| ``OUTPUT/shards/NNNNN.{tar,parquet}``, ``NNNNN_stats.json``, ``OUTPUT/_PLAN.json`` | :mod:`.output` |
| DataComp's metadata parquet + npz (input) | :mod:`.datacomp` |
| ``WORKDIR/*/_join/*.parquet`` (uid-bucketed intermediates) | :mod:`.buckets` |
| ``WORKDIR/<stage>/_MANIFEST.json`` (every committed file's size and checksum) | :mod:`.manifest` |

Stages, the report, the demo, the tests and the benchmarks read and write these files only
through these modules.
"""
