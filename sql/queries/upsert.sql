-- Statements of the writer (zenpipe.upsert). The scalar columns appear in the order of
-- zenpipe.upsert.SCALAR_COLUMNS, which is also the slot order of zen_contacts.observed_us;
-- tests/test_upsert.py checks that this file and the Python list agree.

-- name: begin_write
-- First statement of a write, one round trip per batch (not per row, not per chunk):
-- (1) for a plain upsert(), its idempotency key: inserted, or found when an earlier
--     attempt of the same call committed (its acknowledgement was lost: the caller then
--     writes nothing), or waited for while that attempt's transaction is in doubt (the
--     unique index entry is held until it ends). NULL key: no insert (upsert_and_complete
--     and conn= calls);
-- (2) which distinct source_ids of the batch have no results row: those records are
--     rejected before the merge, whatever the order they arrive in (the foreign key would
--     only refuse a source_id that wins its column's merge). Primary-key lookups;
--     a results row deleted between this check and the merge still meets the foreign
--     key (bisected out, db_foreign_key_violation);
-- (3) which records' explicit observation times are more than %(max_future)s us ahead of
--     the database clock: the authoritative future guard (the writer's own check uses
--     its own clock, which may be skewed).
WITH new_key AS (
    INSERT INTO zen_upsert_keys (key)
    SELECT k FROM (SELECT %(key)s::uuid) AS x (k) WHERE k IS NOT NULL
    ON CONFLICT (key) DO NOTHING
    RETURNING 1
)
SELECT
    (SELECT count(*) FROM new_key) AS key_inserted,
    ARRAY(SELECT b.id
          FROM unnest(%(source_ids)b::bigint[]) AS b (id)
          WHERE NOT EXISTS (SELECT 1 FROM results AS r WHERE r.id = b.id)
          ORDER BY b.id) AS unknown_source_ids,
    ARRAY(SELECT o.i
          FROM unnest(%(obs_index)b::integer[], %(obs_us)b::bigint[]) AS o (i, us)
          WHERE o.us > zen_clock_us_v1() + %(max_future)s
          ORDER BY o.i) AS in_future;

-- name: batch_done
-- Only on a retry of upsert_and_complete: when the previous attempt lost its connection
-- during COMMIT, the commit may have landed, or may still be in progress (waiting for a
-- synchronous standby): that transaction then still holds these rows' locks. Lock the
-- rows by primary key first, in id order (FOR NO KEY UPDATE: the lock complete() takes;
-- it does not block foreign key checks), so an in-doubt transaction is waited out; the
-- locked rows are the latest committed versions (READ COMMITTED re-reads a row it waited
-- for). The claim's rows done under this batch's token and claim_id prove the commit
-- landed (the claim_id is unique per claim even where tokens repeat: docs/claiming.md),
-- and the retry must then not write again (scrape_count would count the batch twice).
WITH locked AS MATERIALIZED (
    SELECT r.id, r.claim_token, r.claim_id, r.status
    FROM results AS r
    WHERE r.id = ANY (%(ids)b::bigint[])
    ORDER BY r.id
    FOR NO KEY UPDATE
)
SELECT count(*)
FROM locked AS l
JOIN unnest(%(ids)b::bigint[], %(tokens)b::bigint[], %(claim_ids)b::uuid[])
     AS b (id, token, claim_id)
  ON l.id = b.id AND l.claim_token = b.token AND l.claim_id = b.claim_id
WHERE l.status = 'done';

-- name: prune_upsert_keys
-- Bounded delete of idempotency keys older than any retry can be: at most %(limit)s
-- rows per statement, found by the committed_at index, so a large backlog never holds
-- many row locks or one long transaction.
DELETE FROM zen_upsert_keys
WHERE key IN (SELECT k.key
              FROM zen_upsert_keys AS k
              WHERE k.committed_at < now() - %(older_than)s::interval
              ORDER BY k.committed_at
              LIMIT %(limit)s
              FOR UPDATE SKIP LOCKED);

-- name: merge_rows
-- The merge of one round, staged as bound arrays (one per column, unnest()ed in
-- parallel) instead of a temporary table: no CREATE/COPY/DROP per batch (about 160
-- catalog rows churned per batch, and every merge planned afresh against a new table),
-- and on a direct connection one prepared plan for every batch. The arrays are sent in
-- binary (placeholders with b): psycopg's text-format list dumper escapes every element
-- with a regular expression, 86 ms of Python per 1,000 rows against 20 ms in binary.
-- emails, phones and
-- whatsapp come as array literals, one per row (arrays of arrays must be rectangular).
-- Rows enter in ord order, the same total order in every writer, so two writers never
-- lock keys in opposite orders (no deadlock); the bisection binds a slice of the
-- arrays inside a savepoint. The conflict target is the table's unique (source_link,
-- partition_key); DO UPDATE SET uses only IMMUTABLE subquery-free functions and
-- EXCLUDED (Citus), never touches the distribution column, and sets updated_at itself.
-- The arrays' two common cases, nothing new (an empty or contained array: the union is
-- the stored array), are decided inline, where they cost about 0.3 us a row: the SQL
-- function zen_array_union_v1 is not inlinable (its union is a subquery) and costs
-- about 8 us a call even when it returns at once (100,000 calls, PostgreSQL 15).
-- Each observation slot holds the record's time for the columns it carries, NULL for
-- the others; zen_pick_v1 keeps the newest observation per column. A record without
-- observed_at is observed at the database clock (zen_clock_us_v1, in the inserted
-- values, where Citus allows a non-IMMUTABLE function), never at the writer's.
-- RETURNING the links merged: a link of the round that is missing was left out by the
-- source_id / future checks above (links are unique within a round).
INSERT INTO zen_contacts AS c (
    partition_key, source_link,
    source_id, business_name, business_category, website, website_domain, description,
    price_level, business_status, country_code, region, city, district, address,
    postal_code, latitude, longitude, timezone, plus_code, place_id, google_cid,
    maps_url, rating, reviews_count, maps_phone, opening_hours, photos_count,
    is_claimed, emails_validated, primary_email, whatsapp_validated, facebook_url,
    instagram_url, linkedin_url, twitter_url, youtube_url, tiktok_url, website_title,
    website_status_code, website_language, contact_page_url, pages_crawled,
    scrape_status, scrape_error, last_scrape_server,
    emails, phones, whatsapp, observed_us, observed_at, scrape_count, updated_at)
SELECT
    s.partition_key, s.source_link,
    s.source_id, s.business_name, s.business_category, s.website,
    s.website_domain, s.description, s.price_level, s.business_status,
    s.country_code, s.region, s.city, s.district,
    s.address, s.postal_code, s.latitude, s.longitude,
    s.timezone, s.plus_code, s.place_id, s.google_cid,
    s.maps_url, s.rating::numeric(2, 1), s.reviews_count, s.maps_phone,
    s.opening_hours, s.photos_count, s.is_claimed, coalesce(s.emails_validated, '{}'),
    s.primary_email, coalesce(s.whatsapp_validated, '{}'), s.facebook_url, s.instagram_url,
    s.linkedin_url, s.twitter_url, s.youtube_url, s.tiktok_url,
    s.website_title, s.website_status_code, s.website_language, s.contact_page_url,
    s.pages_crawled, coalesce(s.scrape_status, 'pending'), s.scrape_error, s.last_scrape_server,
    s.emails::text[], s.phones::text[], s.whatsapp::text[],
    ARRAY[
        CASE WHEN s.source_id IS NULL THEN NULL ELSE s.us END,  -- 1
        CASE WHEN s.business_name IS NULL THEN NULL ELSE s.us END,  -- 2
        CASE WHEN s.business_category IS NULL THEN NULL ELSE s.us END,  -- 3
        CASE WHEN s.website IS NULL THEN NULL ELSE s.us END,  -- 4
        CASE WHEN s.website_domain IS NULL THEN NULL ELSE s.us END,  -- 5
        CASE WHEN s.description IS NULL THEN NULL ELSE s.us END,  -- 6
        CASE WHEN s.price_level IS NULL THEN NULL ELSE s.us END,  -- 7
        CASE WHEN s.business_status IS NULL THEN NULL ELSE s.us END,  -- 8
        CASE WHEN s.country_code IS NULL THEN NULL ELSE s.us END,  -- 9
        CASE WHEN s.region IS NULL THEN NULL ELSE s.us END,  -- 10
        CASE WHEN s.city IS NULL THEN NULL ELSE s.us END,  -- 11
        CASE WHEN s.district IS NULL THEN NULL ELSE s.us END,  -- 12
        CASE WHEN s.address IS NULL THEN NULL ELSE s.us END,  -- 13
        CASE WHEN s.postal_code IS NULL THEN NULL ELSE s.us END,  -- 14
        CASE WHEN s.latitude IS NULL THEN NULL ELSE s.us END,  -- 15
        CASE WHEN s.longitude IS NULL THEN NULL ELSE s.us END,  -- 16
        CASE WHEN s.timezone IS NULL THEN NULL ELSE s.us END,  -- 17
        CASE WHEN s.plus_code IS NULL THEN NULL ELSE s.us END,  -- 18
        CASE WHEN s.place_id IS NULL THEN NULL ELSE s.us END,  -- 19
        CASE WHEN s.google_cid IS NULL THEN NULL ELSE s.us END,  -- 20
        CASE WHEN s.maps_url IS NULL THEN NULL ELSE s.us END,  -- 21
        CASE WHEN s.rating IS NULL THEN NULL ELSE s.us END,  -- 22
        CASE WHEN s.reviews_count IS NULL THEN NULL ELSE s.us END,  -- 23
        CASE WHEN s.maps_phone IS NULL THEN NULL ELSE s.us END,  -- 24
        CASE WHEN s.opening_hours IS NULL THEN NULL ELSE s.us END,  -- 25
        CASE WHEN s.photos_count IS NULL THEN NULL ELSE s.us END,  -- 26
        CASE WHEN s.is_claimed IS NULL THEN NULL ELSE s.us END,  -- 27
        CASE WHEN s.emails_validated IS NULL THEN NULL ELSE s.us END,  -- 28
        CASE WHEN s.primary_email IS NULL THEN NULL ELSE s.us END,  -- 29
        CASE WHEN s.whatsapp_validated IS NULL THEN NULL ELSE s.us END,  -- 30
        CASE WHEN s.facebook_url IS NULL THEN NULL ELSE s.us END,  -- 31
        CASE WHEN s.instagram_url IS NULL THEN NULL ELSE s.us END,  -- 32
        CASE WHEN s.linkedin_url IS NULL THEN NULL ELSE s.us END,  -- 33
        CASE WHEN s.twitter_url IS NULL THEN NULL ELSE s.us END,  -- 34
        CASE WHEN s.youtube_url IS NULL THEN NULL ELSE s.us END,  -- 35
        CASE WHEN s.tiktok_url IS NULL THEN NULL ELSE s.us END,  -- 36
        CASE WHEN s.website_title IS NULL THEN NULL ELSE s.us END,  -- 37
        CASE WHEN s.website_status_code IS NULL THEN NULL ELSE s.us END,  -- 38
        CASE WHEN s.website_language IS NULL THEN NULL ELSE s.us END,  -- 39
        CASE WHEN s.contact_page_url IS NULL THEN NULL ELSE s.us END,  -- 40
        CASE WHEN s.pages_crawled IS NULL THEN NULL ELSE s.us END,  -- 41
        CASE WHEN s.scrape_status IS NULL THEN NULL ELSE s.us END,  -- 42
        CASE WHEN s.scrape_error IS NULL THEN NULL ELSE s.us END,  -- 43
        CASE WHEN s.last_scrape_server IS NULL THEN NULL ELSE s.us END  -- 44
    ]::bigint[],
    timestamptz 'epoch' + s.us * interval '1 microsecond',
    1,
    now()
FROM (SELECT u.*, coalesce(u.observed_us, zen_clock_us_v1()) AS us
      FROM unnest(%(ord)b::integer[],
             %(partition_key)b::integer[],
             %(source_link)b::text[],
             %(observed_us)b::bigint[],
             %(source_id)b::bigint[],
             %(business_name)b::text[],
             %(business_category)b::text[],
             %(website)b::text[],
             %(website_domain)b::text[],
             %(description)b::text[],
             %(price_level)b::smallint[],
             %(business_status)b::text[],
             %(country_code)b::text[],
             %(region)b::text[],
             %(city)b::text[],
             %(district)b::text[],
             %(address)b::text[],
             %(postal_code)b::text[],
             %(latitude)b::double precision[],
             %(longitude)b::double precision[],
             %(timezone)b::text[],
             %(plus_code)b::text[],
             %(place_id)b::text[],
             %(google_cid)b::text[],
             %(maps_url)b::text[],
             %(rating)b::double precision[],
             %(reviews_count)b::integer[],
             %(maps_phone)b::text[],
             %(opening_hours)b::jsonb[],
             %(photos_count)b::integer[],
             %(is_claimed)b::boolean[],
             %(emails_validated)b::jsonb[],
             %(primary_email)b::text[],
             %(whatsapp_validated)b::jsonb[],
             %(facebook_url)b::text[],
             %(instagram_url)b::text[],
             %(linkedin_url)b::text[],
             %(twitter_url)b::text[],
             %(youtube_url)b::text[],
             %(tiktok_url)b::text[],
             %(website_title)b::text[],
             %(website_status_code)b::smallint[],
             %(website_language)b::text[],
             %(contact_page_url)b::text[],
             %(pages_crawled)b::integer[],
             %(scrape_status)b::text[],
             %(scrape_error)b::text[],
             %(last_scrape_server)b::text[],
             %(emails)b::text[],
             %(phones)b::text[],
             %(whatsapp)b::text[])
           AS u (ord, partition_key, source_link, observed_us, source_id, business_name, business_category, website, website_domain, description, price_level, business_status, country_code, region, city, district, address, postal_code, latitude, longitude, timezone, plus_code, place_id, google_cid, maps_url, rating, reviews_count, maps_phone, opening_hours, photos_count, is_claimed, emails_validated, primary_email, whatsapp_validated, facebook_url, instagram_url, linkedin_url, twitter_url, youtube_url, tiktok_url, website_title, website_status_code, website_language, contact_page_url, pages_crawled, scrape_status, scrape_error, last_scrape_server, emails, phones, whatsapp)
      WHERE -- refused whatever the merge order: a source_id without its results row (the
        -- foreign key would only refuse one that wins its column's merge), an explicit
        -- observation time too far ahead of the database clock (the authoritative
        -- future guard). Left out here; the caller tells them by RETURNING.
            (u.source_id IS NULL OR EXISTS (SELECT FROM results AS r WHERE r.id = u.source_id))
        AND (u.observed_us IS NULL OR u.observed_us <= zen_clock_us_v1() + %(max_future)s)) AS s
ORDER BY s.ord
ON CONFLICT (source_link, partition_key) DO UPDATE SET
    source_id = zen_pick_v1(c.source_id, c.observed_us[1], EXCLUDED.source_id, EXCLUDED.observed_us[1]),
    business_name = zen_pick_v1(c.business_name, c.observed_us[2], EXCLUDED.business_name, EXCLUDED.observed_us[2]),
    business_category = zen_pick_v1(c.business_category, c.observed_us[3], EXCLUDED.business_category, EXCLUDED.observed_us[3]),
    website = zen_pick_v1(c.website, c.observed_us[4], EXCLUDED.website, EXCLUDED.observed_us[4]),
    website_domain = zen_pick_v1(c.website_domain, c.observed_us[5], EXCLUDED.website_domain, EXCLUDED.observed_us[5]),
    description = zen_pick_v1(c.description, c.observed_us[6], EXCLUDED.description, EXCLUDED.observed_us[6]),
    price_level = zen_pick_v1(c.price_level, c.observed_us[7], EXCLUDED.price_level, EXCLUDED.observed_us[7]),
    business_status = zen_pick_v1(c.business_status, c.observed_us[8], EXCLUDED.business_status, EXCLUDED.observed_us[8]),
    country_code = zen_pick_v1(c.country_code, c.observed_us[9], EXCLUDED.country_code, EXCLUDED.observed_us[9]),
    region = zen_pick_v1(c.region, c.observed_us[10], EXCLUDED.region, EXCLUDED.observed_us[10]),
    city = zen_pick_v1(c.city, c.observed_us[11], EXCLUDED.city, EXCLUDED.observed_us[11]),
    district = zen_pick_v1(c.district, c.observed_us[12], EXCLUDED.district, EXCLUDED.observed_us[12]),
    address = zen_pick_v1(c.address, c.observed_us[13], EXCLUDED.address, EXCLUDED.observed_us[13]),
    postal_code = zen_pick_v1(c.postal_code, c.observed_us[14], EXCLUDED.postal_code, EXCLUDED.observed_us[14]),
    latitude = zen_pick_v1(c.latitude, c.observed_us[15], EXCLUDED.latitude, EXCLUDED.observed_us[15]),
    longitude = zen_pick_v1(c.longitude, c.observed_us[16], EXCLUDED.longitude, EXCLUDED.observed_us[16]),
    timezone = zen_pick_v1(c.timezone, c.observed_us[17], EXCLUDED.timezone, EXCLUDED.observed_us[17]),
    plus_code = zen_pick_v1(c.plus_code, c.observed_us[18], EXCLUDED.plus_code, EXCLUDED.observed_us[18]),
    place_id = zen_pick_v1(c.place_id, c.observed_us[19], EXCLUDED.place_id, EXCLUDED.observed_us[19]),
    google_cid = zen_pick_v1(c.google_cid, c.observed_us[20], EXCLUDED.google_cid, EXCLUDED.observed_us[20]),
    maps_url = zen_pick_v1(c.maps_url, c.observed_us[21], EXCLUDED.maps_url, EXCLUDED.observed_us[21]),
    rating = zen_pick_v1(c.rating, c.observed_us[22], EXCLUDED.rating, EXCLUDED.observed_us[22]),
    reviews_count = zen_pick_v1(c.reviews_count, c.observed_us[23], EXCLUDED.reviews_count, EXCLUDED.observed_us[23]),
    maps_phone = zen_pick_v1(c.maps_phone, c.observed_us[24], EXCLUDED.maps_phone, EXCLUDED.observed_us[24]),
    opening_hours = zen_pick_v1(c.opening_hours, c.observed_us[25], EXCLUDED.opening_hours, EXCLUDED.observed_us[25]),
    photos_count = zen_pick_v1(c.photos_count, c.observed_us[26], EXCLUDED.photos_count, EXCLUDED.observed_us[26]),
    is_claimed = zen_pick_v1(c.is_claimed, c.observed_us[27], EXCLUDED.is_claimed, EXCLUDED.observed_us[27]),
    emails_validated = zen_pick_v1(c.emails_validated, c.observed_us[28], EXCLUDED.emails_validated, EXCLUDED.observed_us[28]),
    primary_email = zen_pick_v1(c.primary_email, c.observed_us[29], EXCLUDED.primary_email, EXCLUDED.observed_us[29]),
    whatsapp_validated = zen_pick_v1(c.whatsapp_validated, c.observed_us[30], EXCLUDED.whatsapp_validated, EXCLUDED.observed_us[30]),
    facebook_url = zen_pick_v1(c.facebook_url, c.observed_us[31], EXCLUDED.facebook_url, EXCLUDED.observed_us[31]),
    instagram_url = zen_pick_v1(c.instagram_url, c.observed_us[32], EXCLUDED.instagram_url, EXCLUDED.observed_us[32]),
    linkedin_url = zen_pick_v1(c.linkedin_url, c.observed_us[33], EXCLUDED.linkedin_url, EXCLUDED.observed_us[33]),
    twitter_url = zen_pick_v1(c.twitter_url, c.observed_us[34], EXCLUDED.twitter_url, EXCLUDED.observed_us[34]),
    youtube_url = zen_pick_v1(c.youtube_url, c.observed_us[35], EXCLUDED.youtube_url, EXCLUDED.observed_us[35]),
    tiktok_url = zen_pick_v1(c.tiktok_url, c.observed_us[36], EXCLUDED.tiktok_url, EXCLUDED.observed_us[36]),
    website_title = zen_pick_v1(c.website_title, c.observed_us[37], EXCLUDED.website_title, EXCLUDED.observed_us[37]),
    website_status_code = zen_pick_v1(c.website_status_code, c.observed_us[38], EXCLUDED.website_status_code, EXCLUDED.observed_us[38]),
    website_language = zen_pick_v1(c.website_language, c.observed_us[39], EXCLUDED.website_language, EXCLUDED.observed_us[39]),
    contact_page_url = zen_pick_v1(c.contact_page_url, c.observed_us[40], EXCLUDED.contact_page_url, EXCLUDED.observed_us[40]),
    pages_crawled = zen_pick_v1(c.pages_crawled, c.observed_us[41], EXCLUDED.pages_crawled, EXCLUDED.observed_us[41]),
    scrape_status = zen_pick_v1(c.scrape_status, c.observed_us[42], EXCLUDED.scrape_status, EXCLUDED.observed_us[42]),
    scrape_error = zen_pick_v1(c.scrape_error, c.observed_us[43], EXCLUDED.scrape_error, EXCLUDED.observed_us[43]),
    last_scrape_server = zen_pick_v1(c.last_scrape_server, c.observed_us[44], EXCLUDED.last_scrape_server, EXCLUDED.observed_us[44]),
    emails = CASE WHEN cardinality(EXCLUDED.emails) = 0 OR c.emails @> EXCLUDED.emails THEN c.emails
             ELSE zen_array_union_v1(c.emails, EXCLUDED.emails) END,
    phones = CASE WHEN cardinality(EXCLUDED.phones) = 0 OR c.phones @> EXCLUDED.phones THEN c.phones
             ELSE zen_array_union_v1(c.phones, EXCLUDED.phones) END,
    whatsapp = CASE WHEN cardinality(EXCLUDED.whatsapp) = 0 OR c.whatsapp @> EXCLUDED.whatsapp THEN c.whatsapp
               ELSE zen_array_union_v1(c.whatsapp, EXCLUDED.whatsapp) END,
    observed_us = ARRAY[
        greatest(c.observed_us[1], EXCLUDED.observed_us[1]),
        greatest(c.observed_us[2], EXCLUDED.observed_us[2]),
        greatest(c.observed_us[3], EXCLUDED.observed_us[3]),
        greatest(c.observed_us[4], EXCLUDED.observed_us[4]),
        greatest(c.observed_us[5], EXCLUDED.observed_us[5]),
        greatest(c.observed_us[6], EXCLUDED.observed_us[6]),
        greatest(c.observed_us[7], EXCLUDED.observed_us[7]),
        greatest(c.observed_us[8], EXCLUDED.observed_us[8]),
        greatest(c.observed_us[9], EXCLUDED.observed_us[9]),
        greatest(c.observed_us[10], EXCLUDED.observed_us[10]),
        greatest(c.observed_us[11], EXCLUDED.observed_us[11]),
        greatest(c.observed_us[12], EXCLUDED.observed_us[12]),
        greatest(c.observed_us[13], EXCLUDED.observed_us[13]),
        greatest(c.observed_us[14], EXCLUDED.observed_us[14]),
        greatest(c.observed_us[15], EXCLUDED.observed_us[15]),
        greatest(c.observed_us[16], EXCLUDED.observed_us[16]),
        greatest(c.observed_us[17], EXCLUDED.observed_us[17]),
        greatest(c.observed_us[18], EXCLUDED.observed_us[18]),
        greatest(c.observed_us[19], EXCLUDED.observed_us[19]),
        greatest(c.observed_us[20], EXCLUDED.observed_us[20]),
        greatest(c.observed_us[21], EXCLUDED.observed_us[21]),
        greatest(c.observed_us[22], EXCLUDED.observed_us[22]),
        greatest(c.observed_us[23], EXCLUDED.observed_us[23]),
        greatest(c.observed_us[24], EXCLUDED.observed_us[24]),
        greatest(c.observed_us[25], EXCLUDED.observed_us[25]),
        greatest(c.observed_us[26], EXCLUDED.observed_us[26]),
        greatest(c.observed_us[27], EXCLUDED.observed_us[27]),
        greatest(c.observed_us[28], EXCLUDED.observed_us[28]),
        greatest(c.observed_us[29], EXCLUDED.observed_us[29]),
        greatest(c.observed_us[30], EXCLUDED.observed_us[30]),
        greatest(c.observed_us[31], EXCLUDED.observed_us[31]),
        greatest(c.observed_us[32], EXCLUDED.observed_us[32]),
        greatest(c.observed_us[33], EXCLUDED.observed_us[33]),
        greatest(c.observed_us[34], EXCLUDED.observed_us[34]),
        greatest(c.observed_us[35], EXCLUDED.observed_us[35]),
        greatest(c.observed_us[36], EXCLUDED.observed_us[36]),
        greatest(c.observed_us[37], EXCLUDED.observed_us[37]),
        greatest(c.observed_us[38], EXCLUDED.observed_us[38]),
        greatest(c.observed_us[39], EXCLUDED.observed_us[39]),
        greatest(c.observed_us[40], EXCLUDED.observed_us[40]),
        greatest(c.observed_us[41], EXCLUDED.observed_us[41]),
        greatest(c.observed_us[42], EXCLUDED.observed_us[42]),
        greatest(c.observed_us[43], EXCLUDED.observed_us[43]),
        greatest(c.observed_us[44], EXCLUDED.observed_us[44])
    ]::bigint[],
    observed_at = greatest(c.observed_at, EXCLUDED.observed_at),
    scrape_count = c.scrape_count + 1,
    updated_at = EXCLUDED.updated_at
RETURNING c.source_link;

-- name: insert_rejects
-- The rejects of a batch as bound arrays, in the batch's transaction (COPY cannot run in
-- a pipeline; rejects are few, so one INSERT of unnest()ed arrays costs nothing).
INSERT INTO zen_rejects (server_id, row_index, source_link, field, reason, detail, problems,
                         payload, payload_is_repr)
SELECT %(server_id)s, u.row_index, u.source_link, u.field, u.reason, u.detail, u.problems,
       u.payload, u.payload_is_repr
FROM unnest(%(row_index)b::integer[], %(source_link)b::text[], %(field)b::text[],
            %(reason)b::text[], %(detail)b::text[], %(problems)b::jsonb[],
            %(payload)b::jsonb[], %(payload_is_repr)b::boolean[])
     AS u (row_index, source_link, field, reason, detail, problems, payload, payload_is_repr);

-- name: savepoint
-- Around each merge of the careful path (a caller's transaction, a retry, a batch with a
-- row PostgreSQL refuses): rolling back to it undoes one merge, and the bisection goes on.
SAVEPOINT zen_merge;

-- name: release
RELEASE SAVEPOINT zen_merge;

-- name: rollback_to
ROLLBACK TO SAVEPOINT zen_merge;

-- name: copy_clock
-- Only before the COPY path's first chunk (Upserter copy_rows): the database clock, a
-- lower bound of zen_clock_us_v1() in every later statement of the transaction, so a row
-- whose observation time passes the future guard here passes the merge's too; and
-- whether this is a Citus coordinator (the COPY path is then off).
SELECT zen_clock_us_v1() AS clock_us,
       EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') AS on_citus;

-- name: copy_rows
-- The COPY path for a chunk's first round when none of its links exists yet: the rows
-- as the merge would insert them fresh (observation slots, observed_at, scrape_count 1,
-- the coalesce defaults: computed by the writer), in binary, into the parent table
-- (PostgreSQL routes each row to its partition). created_at and updated_at take their
-- defaults, now(), as in the merge. Inside a savepoint: a unique violation (the link
-- exists, or another writer inserted it meanwhile), a foreign key violation (unknown
-- source_id) or any data error rolls back to it and the chunk is merged instead.
-- {columns}: partition_key, source_link, the SCALAR_COLUMNS, emails, phones, whatsapp,
-- observed_us, observed_at, scrape_count (composed by the writer).
COPY zen_contacts ({columns}) FROM STDIN (FORMAT BINARY);
