"""Everything that reads, writes or transforms a LoRA file: layouts (`layout`), adapter modules and their
updates (`modules`), low-rank math (`lowrank`), metadata (`metadata`), file I/O (`files`) and structural checks
(`checks`); and the tools, one module per verb (`inspect`, `convert`, `merge`, `mix`, `apply`)."""
