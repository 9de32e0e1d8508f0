-- Statements of `zenpipe migrate-legacy` (zenpipe.legacy).

-- name: try_lock
-- One migration per source at a time (transaction lock held by each batch).
SELECT pg_try_advisory_xact_lock(%(namespace)s, %(key)s);

-- name: progress
-- Resume point of a source, locked by the batch that will move it.
SELECT last_id, rows_read, written, merged, rejected, batches, finished_at
FROM zen_legacy_progress WHERE source = %(source)s FOR UPDATE;

-- name: start
INSERT INTO zen_legacy_progress (source) VALUES (%(source)s) ON CONFLICT (source) DO NOTHING;

-- name: advance
-- In the batch's own transaction: the batch and its resume point commit together.
UPDATE zen_legacy_progress
SET last_id = %(last_id)s,
    rows_read = rows_read + %(read)s,
    written = written + %(written)s,
    merged = merged + %(merged)s,
    rejected = rejected + %(rejected)s,
    batches = batches + 1,
    updated_at = now()
WHERE source = %(source)s;

-- name: finish
UPDATE zen_legacy_progress SET finished_at = now(), updated_at = now()
WHERE source = %(source)s AND finished_at IS NULL;

-- name: v1_batch
-- Keyset read in id order (primary key): each batch starts where the last one ended.
SELECT id, name, category, website, country, city, address, lat, lng, rating, reviews,
       phone, emails, phones, whatsapp, facebook, instagram, linkedin, twitter, youtube,
       tiktok, link, scraped_at
FROM scraped_contacts
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: v2_batch
-- Keyset read in id order across the partitions (scraped_contacts_v2_id_idx on each,
-- merged in order).
SELECT id, source_link, business_name, business_category, website, country_code, city,
       address, latitude, longitude, rating, reviews_count, maps_phone, emails, phones,
       whatsapp, socials, updated_at
FROM scraped_contacts_v2
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: source_count
SELECT count(*) FROM {table};

-- name: links_present
-- Verification: distinct source links that now have a contact (the key lookup of
-- zen_contacts_source_link_key, one per link).
SELECT count(DISTINCT s.{link}) FROM {table} AS s
WHERE EXISTS (SELECT 1 FROM zen_contacts AS c
              WHERE c.source_link = s.{link} AND c.partition_key = hashtext(s.{link}));

-- name: totals
SELECT rows_read, written, merged, rejected, batches
FROM zen_legacy_progress WHERE source = %(source)s;

-- name: table_exists
SELECT to_regclass(%(table)s) IS NOT NULL;
