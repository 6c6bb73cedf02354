-- Dashboard views over the output tables (DuckDB).
--
-- infra.views.create_views(connection, OUT) first defines one view per table over its Parquet
-- files (pairs, matches, candidates, errors, runs, and images_all = every images row), with the
-- hive partition columns `model` and `date`; then runs this file. Join keys:
--   pairs.output_key = matches.output_key        one explanation (pair, model, layer, settings)
--     AND pairs.commit_id = matches.commit_id    the batch write that committed it (matches of a
--                                                batch that never wrote its pairs rows are ignored)
--   candidates.output_key = pairs.output_key     the explanation a candidate was ranked with
--   pairs.image_0 / image_1, candidates.query / gallery_image = images.image_uri (same model_id)
--   (date, model_id)                             a night
-- pair_id alone is NOT a key: the same pair is explained once per model (and layer), and two
-- names of one content (two pair ids) share one explanation (one output_key).

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

-- One row per candidate, with the metrics of the explanation it was ranked with.
CREATE OR REPLACE VIEW candidate_review AS
SELECT c.date, c.model_id, c.model_spec, c.query, c.rank, c.gallery_image, c.individual, c.similarity,
       c.irm, c.rerank_score, c.pair_id, c.layer, c.viz_uri, p.n_matches, p.inliers, p.residual_px,
       p.match_coverage, p.relevance_share, c.run_id, c.output_key
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
