-- Dashboard views over the output tables (DuckDB 2.0 or newer).
--
-- On its own, in the DuckDB CLI or any DuckDB client: set the output root, then run this file.
--   SET VARIABLE pairx_out = '/data/pairx-out';     -- or 's3://bucket/prefix' (load httpfs and
--   .read infra/views.sql                           --  create a secret first)
-- From Python, infra.views.create_views(connection, OUT) does the same (its own base views, then
-- the derived views below the "derived views" line). The base views are generated from the table
-- schemas: infra.views.write_views_sql() rewrites them after a schema change.
--
-- Base views: one per table (pairs, matches, candidates, errors, runs, and images_all = every
-- images row) over OUT/tables/<table>/**/*.parquet with the hive partition columns `model` and
-- `date`; a table with no file yet is an empty view with the schema's columns (files of older
-- versions lack newer columns: union_by_name). Join keys:
--   pairs.output_key = matches.output_key        one explanation (pair, model, layer, settings)
--     AND pairs.commit_id = matches.commit_id    the batch write that committed it (matches of a
--                                                batch that never wrote its pairs rows are ignored)
--   candidates.output_key = pairs.output_key     the explanation a candidate was ranked with
--   pairs.image_0 / image_1, candidates.query / gallery_image = images.image_uri (same model_id)
--   (date, model_id)                             a night
-- pair_id alone is NOT a key: the same pair is explained once per model (and layer), and two
-- names of one content (two pair ids) share one explanation (one output_key).

-- base views (generated from infra.tables.TABLE_SCHEMAS)

CREATE OR REPLACE VIEW pairs AS
SELECT COLUMNS(lambda c: c <> 'empty') FROM (
  SELECT
        NULL::VARCHAR AS pair_id, NULL::VARCHAR AS image_0, NULL::VARCHAR AS image_1,
        NULL::VARCHAR AS layer, NULL::DOUBLE AS similarity, NULL::INTEGER AS n_matches,
        NULL::DOUBLE AS residual_px, NULL::INTEGER AS inliers, NULL::DOUBLE AS irm,
        NULL::DOUBLE AS match_coverage, NULL::DOUBLE AS relevance_share,
        NULL::DOUBLE AS match_share, NULL::VARCHAR AS viz_uri, NULL::DOUBLE[] AS box_0,
        NULL::DOUBLE[] AS box_1, NULL::DOUBLE AS theta_0, NULL::DOUBLE AS theta_1,
        NULL::VARCHAR AS model_spec, NULL::VARCHAR AS model_id, NULL::VARCHAR AS run_id,
        NULL::TIMESTAMPTZ AS created_at, NULL::VARCHAR AS output_key, NULL::VARCHAR AS commit_id,
        NULL::VARCHAR AS model, NULL::DATE AS date
  WHERE false
  UNION ALL BY NAME
  SELECT * FROM read_parquet(getvariable('pairx_out') || '/tables/pairs/**/*.parquet',
                             hive_partitioning = true, union_by_name = true, allow_empty = true)
);

CREATE OR REPLACE VIEW matches AS
SELECT COLUMNS(lambda c: c <> 'empty') FROM (
  SELECT
        NULL::VARCHAR AS pair_id, NULL::VARCHAR AS layer, NULL::INTEGER AS rank,
        NULL::FLOAT AS x_0, NULL::FLOAT AS y_0, NULL::FLOAT AS x_1, NULL::FLOAT AS y_1,
        NULL::FLOAT AS distance, NULL::FLOAT AS relevance, NULL::VARCHAR AS model_id,
        NULL::VARCHAR AS output_key, NULL::VARCHAR AS commit_id, NULL::VARCHAR AS model,
        NULL::DATE AS date
  WHERE false
  UNION ALL BY NAME
  SELECT * FROM read_parquet(getvariable('pairx_out') || '/tables/matches/**/*.parquet',
                             hive_partitioning = true, union_by_name = true, allow_empty = true)
);

CREATE OR REPLACE VIEW candidates AS
SELECT COLUMNS(lambda c: c <> 'empty') FROM (
  SELECT
        NULL::VARCHAR AS query, NULL::INTEGER AS rank, NULL::VARCHAR AS gallery_image,
        NULL::VARCHAR AS individual, NULL::DOUBLE AS similarity, NULL::DOUBLE AS irm,
        NULL::DOUBLE AS rerank_score, NULL::VARCHAR AS pair_id, NULL::VARCHAR AS layer,
        NULL::VARCHAR AS viz_uri, NULL::VARCHAR AS output_key, NULL::VARCHAR AS model_spec,
        NULL::INTEGER AS retrieval_rank, NULL::BOOLEAN AS explained, NULL::INTEGER AS top_k,
        NULL::INTEGER AS n_matches, NULL::INTEGER AS inliers, NULL::DOUBLE AS residual_px,
        NULL::DOUBLE AS match_coverage, NULL::DOUBLE AS relevance_share,
        NULL::DOUBLE AS match_share, NULL::VARCHAR AS query_hash, NULL::INTEGER AS query_detection,
        NULL::VARCHAR AS query_detection_id, NULL::DOUBLE[] AS query_box,
        NULL::DOUBLE AS detection_conf, NULL::VARCHAR AS species, NULL::VARCHAR AS gallery_source,
        NULL::VARCHAR AS model_id, NULL::VARCHAR AS run_id, NULL::TIMESTAMPTZ AS created_at,
        NULL::VARCHAR AS model, NULL::DATE AS date
  WHERE false
  UNION ALL BY NAME
  SELECT * FROM read_parquet(getvariable('pairx_out') || '/tables/candidates/**/*.parquet',
                             hive_partitioning = true, union_by_name = true, allow_empty = true)
);

CREATE OR REPLACE VIEW errors AS
SELECT COLUMNS(lambda c: c <> 'empty') FROM (
  SELECT
        NULL::VARCHAR AS item, NULL::VARCHAR AS stage, NULL::VARCHAR AS error_type,
        NULL::VARCHAR AS message, NULL::VARCHAR AS content_hash, NULL::VARCHAR AS model_id,
        NULL::VARCHAR AS run_id, NULL::TIMESTAMPTZ AS created_at, NULL::VARCHAR AS model,
        NULL::DATE AS date
  WHERE false
  UNION ALL BY NAME
  SELECT * FROM read_parquet(getvariable('pairx_out') || '/tables/errors/**/*.parquet',
                             hive_partitioning = true, union_by_name = true, allow_empty = true)
);

CREATE OR REPLACE VIEW runs AS
SELECT COLUMNS(lambda c: c <> 'empty') FROM (
  SELECT
        NULL::VARCHAR AS run_id, NULL::VARCHAR AS flow, NULL::VARCHAR AS parameters,
        NULL::VARCHAR AS model_id, NULL::BIGINT AS n_done, NULL::BIGINT AS n_skipped,
        NULL::BIGINT AS n_failed, NULL::DOUBLE AS duration_s, NULL::TIMESTAMPTZ AS started_at,
        NULL::TIMESTAMPTZ AS finished_at, NULL::VARCHAR AS status, NULL::VARCHAR AS error,
        NULL::VARCHAR AS model_spec, NULL::VARCHAR AS weights_digest,
        NULL::BOOLEAN AS random_weights, NULL::VARCHAR[] AS workers, NULL::BIGINT AS cache_hits,
        NULL::BIGINT AS cache_misses, NULL::BIGINT AS cache_damaged,
        NULL::BIGINT AS n_repaired_files, NULL::BIGINT AS n_unsupported, NULL::BIGINT AS n_frames,
        NULL::BIGINT AS n_empty, NULL::BIGINT AS n_detections, NULL::BIGINT AS n_retries,
        NULL::VARCHAR AS model, NULL::DATE AS date
  WHERE false
  UNION ALL BY NAME
  SELECT * FROM read_parquet(getvariable('pairx_out') || '/tables/runs/**/*.parquet',
                             hive_partitioning = true, union_by_name = true, allow_empty = true)
);

CREATE OR REPLACE VIEW images_all AS
SELECT COLUMNS(lambda c: c <> 'empty') FROM (
  SELECT
        NULL::VARCHAR AS image_uri, NULL::VARCHAR AS content_hash, NULL::INTEGER AS width,
        NULL::INTEGER AS height, NULL::VARCHAR AS model_id, NULL::TIMESTAMPTZ AS embedded_at,
        NULL::VARCHAR AS run_id, NULL::VARCHAR AS model, NULL::DATE AS date
  WHERE false
  UNION ALL BY NAME
  SELECT * FROM read_parquet(getvariable('pairx_out') || '/tables/images/**/*.parquet',
                             hive_partitioning = true, union_by_name = true, allow_empty = true)
);

CREATE OR REPLACE VIEW decisions AS
SELECT COLUMNS(lambda c: c <> 'empty') FROM (
  SELECT
        NULL::VARCHAR AS decision_id, NULL::VARCHAR AS query, NULL::VARCHAR AS content_hash,
        NULL::DOUBLE[] AS box, NULL::VARCHAR AS detection_id, NULL::VARCHAR AS decision,
        NULL::VARCHAR AS individual, NULL::VARCHAR AS gallery_image, NULL::INTEGER AS rank,
        NULL::INTEGER AS retrieval_rank, NULL::DOUBLE AS similarity, NULL::DOUBLE AS irm,
        NULL::DOUBLE AS rerank_score, NULL::VARCHAR AS night_run_id, NULL::VARCHAR AS reviewer,
        NULL::TIMESTAMPTZ AS decided_at, NULL::VARCHAR AS supersedes, NULL::VARCHAR AS note,
        NULL::VARCHAR AS model_id, NULL::VARCHAR AS run_id, NULL::TIMESTAMPTZ AS created_at,
        NULL::VARCHAR AS model, NULL::DATE AS date
  WHERE false
  UNION ALL BY NAME
  SELECT * FROM read_parquet(getvariable('pairx_out') || '/tables/decisions/**/*.parquet',
                             hive_partitioning = true, union_by_name = true, allow_empty = true)
);


-- ---------------------------------------------------------------- derived views

-- One row per (model_id, image name, image content): the first time it was recorded. Two names
-- of one content are two rows; new bytes under an old name are a second version of that name.
CREATE OR REPLACE VIEW images AS
SELECT * EXCLUDE (row_in_group)
FROM (
    SELECT *, row_number() OVER (PARTITION BY model_id, image_uri, content_hash
                                 ORDER BY embedded_at NULLS LAST) AS row_in_group
    FROM images_all
)
WHERE row_in_group = 1;

-- One row per explanation (model_id, output_key): its first committed pairs row. A key written
-- twice (older outputs, a race between batches) counts once in every view below.
CREATE OR REPLACE VIEW explanations AS
SELECT * EXCLUDE (row_in_group)
FROM (
    SELECT *, row_number() OVER (PARTITION BY model_id, output_key
                                 ORDER BY created_at NULLS LAST, commit_id) AS row_in_group
    FROM pairs
)
WHERE row_in_group = 1;

-- One row per match, with its explanation's images and metrics.
CREATE OR REPLACE VIEW pair_matches AS
SELECT p.date, p.model_id, p.model_spec, p.pair_id, p.layer, p.image_0, p.image_1, p.similarity, p.irm,
       p.viz_uri, m.rank, m.x_0, m.y_0, m.x_1, m.y_1, m.distance, m.relevance, p.output_key
FROM matches AS m
JOIN explanations AS p ON p.output_key = m.output_key AND p.model_id = m.model_id
                      AND p.commit_id IS NOT DISTINCT FROM m.commit_id;

-- One row per candidate (on a re-ranked night every candidate judged, explained or not), with the
-- metrics it was ranked with: its explanation's, else stage 1's from the candidates row.
-- `explained`: a picture exists (null before re-ranking existed); `in_top_k`: one of the night's
-- top_k shown for review (false for one explained first and then displaced by re-ranking; null
-- in rows older than the `top_k` column). Reviewers' list:
--   SELECT * FROM candidate_review WHERE coalesce(in_top_k, explained, true)
CREATE OR REPLACE VIEW candidate_review AS
SELECT c.date, c.model_id, c.model_spec, c.query, c.rank, c.gallery_image, c.individual, c.similarity,
       c.irm, c.rerank_score, c.pair_id, c.layer, c.viz_uri,
       coalesce(p.n_matches, c.n_matches) AS n_matches, coalesce(p.inliers, c.inliers) AS inliers,
       coalesce(p.residual_px, c.residual_px) AS residual_px,
       coalesce(p.match_coverage, c.match_coverage) AS match_coverage,
       coalesce(p.relevance_share, c.relevance_share) AS relevance_share,
       c.retrieval_rank, c.explained, c.rank < c.top_k AS in_top_k, c.run_id, c.output_key
FROM candidates AS c
LEFT JOIN explanations AS p ON p.output_key = c.output_key AND p.model_id = c.model_id;

-- One row per night (UTC write date, model): uploads ranked, pairs explained, failures.
CREATE OR REPLACE VIEW nights AS
WITH c AS (
    SELECT date, model_id, count(DISTINCT query) AS uploads, count(*) AS candidates,
           max(model_spec) AS model_spec
    FROM candidates GROUP BY date, model_id
), p AS (
    SELECT date, model_id, count(DISTINCT output_key) AS pairs, max(model_spec) AS model_spec
    FROM explanations GROUP BY date, model_id
), e AS (
    SELECT date, model_id, count(*) AS failures FROM errors GROUP BY date, model_id
)
SELECT date, model_id, coalesce(c.model_spec, p.model_spec) AS model_spec,
       coalesce(c.uploads, 0) AS uploads, coalesce(p.pairs, 0) AS pairs,
       coalesce(c.candidates, 0) AS candidates, coalesce(e.failures, 0) AS failures
FROM c
FULL OUTER JOIN p USING (date, model_id)
FULL OUTER JOIN e USING (date, model_id);

-- ---------------------------------------------------------------- reviewer decisions
-- decisions: every row ever recorded (pairx review / pairx decide); later rows supersede earlier
-- ones on the same upload, rows are never removed. An upload is a photo (query, content_hash) or,
-- on a camera-trap night, one detection of it (detection_id = candidates.query_detection_id).
-- These views need only the decisions and candidates views.

-- One row per decided upload (query, content_hash, detection_id): its latest decision. An upload
-- whose latest row is an `undo` is pending again and has no row here.
CREATE OR REPLACE VIEW latest_decisions AS
SELECT * EXCLUDE (row_in_upload)
FROM (
    SELECT *, row_number() OVER (PARTITION BY query, content_hash, detection_id
                                 ORDER BY decided_at DESC, decision_id DESC) AS row_in_upload
    FROM decisions
)
WHERE row_in_upload = 1 AND decision <> 'undo';

-- One row per night (date, model): uploads ranked (photos, or detections on a camera-trap night),
-- decided (match, new_individual, no_match), unsure, pending (not decided: unsure or no decision),
-- and the median seconds from the upload's ranking to its decision.
CREATE OR REPLACE VIEW review_progress AS
WITH ranked AS (
    SELECT date, model_id, query, query_detection_id, min(created_at) AS ranked_at
    FROM candidates GROUP BY date, model_id, query, query_detection_id
)
SELECT r.date, r.model_id, count(*) AS uploads,
       count(*) FILTER (WHERE d.decision IN ('match', 'new_individual', 'no_match')) AS decided,
       count(*) FILTER (WHERE d.decision = 'unsure') AS unsure,
       count(*) FILTER (WHERE d.decision IS NULL OR d.decision = 'unsure') AS pending,
       median(greatest(0, date_diff('millisecond', r.ranked_at, d.decided_at) / 1000.0))
           FILTER (WHERE d.decision IN ('match', 'new_individual', 'no_match')) AS median_s_to_decision
FROM ranked AS r
LEFT JOIN latest_decisions AS d
    ON d.query = r.query AND d.detection_id IS NOT DISTINCT FROM r.query_detection_id
GROUP BY r.date, r.model_id;

-- One row per night run and model: of the `match` decisions made on its candidates, the share
-- whose accepted candidate was first by similarity (retrieval rank 0) and first after PAIR-X
-- re-ranking (rank 0). A match on an individual outside the candidates counts as neither.
CREATE OR REPLACE VIEW model_precision AS
WITH runs_of AS (
    SELECT run_id, model_id, min(date) AS date FROM candidates GROUP BY run_id, model_id
)
SELECT r.date, d.night_run_id, d.model_id, count(*) AS matches,
       count(d.rank) AS matches_among_candidates,
       avg(CASE WHEN coalesce(d.retrieval_rank, d.rank) = 0 THEN 1.0 ELSE 0.0 END) AS retrieval_top1_share,
       avg(CASE WHEN d.rank = 0 THEN 1.0 ELSE 0.0 END) AS reranked_top1_share
FROM latest_decisions AS d
LEFT JOIN runs_of AS r ON r.run_id = d.night_run_id AND r.model_id = d.model_id
WHERE d.decision = 'match'
GROUP BY r.date, d.night_run_id, d.model_id;

-- One row per model: over uploads whose latest decision accepted one of their candidates, how
-- well each score picks the accepted candidate among that upload's candidates: ROC AUC = the
-- share of (accepted, other) candidate pairs of the same upload where the accepted one scores
-- higher (ties count one half). 0.5 is chance, 1.0 always right. `comparisons` counts the pairs.
CREATE OR REPLACE VIEW plausibility_calibration AS
WITH accepted AS (
    SELECT query, detection_id, night_run_id, model_id, gallery_image FROM latest_decisions
    WHERE decision = 'match' AND gallery_image IS NOT NULL
), scored AS (
    SELECT c.model_id, c.query, c.query_detection_id, c.rerank_score, c.similarity,
           c.gallery_image = a.gallery_image AS is_accepted
    FROM candidates AS c
    JOIN accepted AS a ON c.query = a.query AND c.query_detection_id IS NOT DISTINCT FROM a.detection_id
        AND c.run_id = a.night_run_id AND c.model_id = a.model_id
), compared AS (
    SELECT p.model_id,
           CASE WHEN p.rerank_score > n.rerank_score THEN 1.0 WHEN p.rerank_score = n.rerank_score THEN 0.5
                WHEN p.rerank_score < n.rerank_score THEN 0.0 END AS rerank_win,
           CASE WHEN p.similarity > n.similarity THEN 1.0 WHEN p.similarity = n.similarity THEN 0.5
                WHEN p.similarity < n.similarity THEN 0.0 END AS similarity_win
    FROM scored AS p
    JOIN scored AS n ON n.model_id = p.model_id AND n.query = p.query
        AND n.query_detection_id IS NOT DISTINCT FROM p.query_detection_id AND p.is_accepted AND NOT n.is_accepted
), counts AS (
    SELECT model_id, count(DISTINCT (query, query_detection_id)) AS uploads, count(*) AS candidates
    FROM scored GROUP BY model_id
)
SELECT k.model_id, k.uploads, k.candidates, count(c.model_id) AS comparisons,
       avg(c.rerank_win) AS auc_rerank_score, avg(c.similarity_win) AS auc_similarity
FROM counts AS k
LEFT JOIN compared AS c ON c.model_id = k.model_id
GROUP BY k.model_id, k.uploads, k.candidates;
