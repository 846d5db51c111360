-- An oracle, not a candidate (the contract keeps every finished task
-- readable): a finished job of one task writes no history.
\ir rewrite-completion.sql
