-- ingestd 0006: the version of a positions:{SYMBOL}:open_count mirror write. It must grow in the
-- order in which writers count, i.e. in the order they hold the positions advisory lock. A
-- transaction id does not: it is assigned at a transaction's first write, which (since the sink
-- takes the lock after its COPYs) can come before another writer's whole turn at the lock, and an
-- older count would then win. nextval() is called under the lock, so its values follow it.
CREATE SEQUENCE ingestd_open_count_version AS BIGINT;
