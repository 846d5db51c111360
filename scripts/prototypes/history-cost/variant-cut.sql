-- one_row and no_indexes together: history's writes for a finished job of
-- one task down from two rows and five index entries to one row and two.
\ir variant-one_row.sql
\ir variant-no_indexes.sql
