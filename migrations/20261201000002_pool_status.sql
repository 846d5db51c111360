-- What the controller last saw and did for each WorkerPool, written after
-- every pass and read by GET /v1/pools. One row a pool: small and hot, so
-- it is updated in place.
CREATE TABLE pool_status (
    pool             text PRIMARY KEY CHECK (pool <> ''),
    -- `fly`, `kubernetes`, `local`: the controller that writes the row.
    backend          text        NOT NULL,
    desired_replicas integer     NOT NULL,
    current_replicas integer     NOT NULL,
    ready_replicas   integer     NOT NULL,
    busy_replicas    integer     NOT NULL,
    pending          bigint      NOT NULL,
    in_flight        bigint      NOT NULL,
    -- Kubernetes-style conditions: [{type, status, reason, message, lastTransitionTime}].
    conditions       jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(conditions) = 'array'),
    last_decision    text,
    last_scale_at    timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
