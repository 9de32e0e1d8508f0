-- zen_contacts: one row per source link, merged from every server's enrichment.
--
-- Partitioned 32 ways by HASH (partition_key), where partition_key = hashtext(source_link)
-- is computed by the writer (zenpipe.keys) and re-checked here, so a row can never be
-- stored under a key that disagrees with its link. partition_key is the full signed
-- int4 (never abs(): it overflows on INT_MIN; never pre-reduced to 0..31: PostgreSQL
-- hashes the key again and a reduced key leaves a third of the partitions empty).
--
-- Counts and has_* flags are generated from the arrays, so they cannot drift from them.

CREATE TABLE zen_contacts (
    id                      bigserial,
    partition_key           integer     NOT NULL,
    source_link             text        COLLATE "C" NOT NULL,
    source_id               bigint,

    -- Business
    business_name           text,
    business_category       text,
    website                 text,
    website_domain          text,
    description             text,
    price_level             smallint
                            CONSTRAINT zen_contacts_price_level_check CHECK (price_level BETWEEN 1 AND 4),
    business_status         text,

    -- Location
    country_code            text
                            CONSTRAINT zen_contacts_country_code_check CHECK (country_code ~ '^[A-Z]{2}$'),
    region                  text,
    city                    text,
    district                text,
    address                 text,
    postal_code             text,
    latitude                double precision
                            CONSTRAINT zen_contacts_latitude_check CHECK (latitude BETWEEN -90 AND 90),
    longitude               double precision
                            CONSTRAINT zen_contacts_longitude_check CHECK (longitude BETWEEN -180 AND 180),
    timezone                text,
    plus_code               text,

    -- Google Maps
    place_id                text,
    google_cid              text,
    maps_url                text,
    rating                  numeric(2, 1)
                            CONSTRAINT zen_contacts_rating_check CHECK (rating BETWEEN 0 AND 5),
    reviews_count           integer
                            CONSTRAINT zen_contacts_reviews_count_check CHECK (reviews_count >= 0),
    maps_phone              text,
    opening_hours           jsonb
                            CONSTRAINT zen_contacts_opening_hours_check
                            CHECK (jsonb_typeof(opening_hours) = 'object'),
    photos_count            integer
                            CONSTRAINT zen_contacts_photos_count_check CHECK (photos_count >= 0),
    is_claimed              boolean,

    -- Enriched: emails
    emails                  text[]      NOT NULL DEFAULT '{}',
    emails_count            integer     GENERATED ALWAYS AS (cardinality(emails)) STORED,
    emails_validated        jsonb       NOT NULL DEFAULT '{}'
                            CONSTRAINT zen_contacts_emails_validated_check
                            CHECK (jsonb_typeof(emails_validated) = 'object'),
    primary_email           text,

    -- Enriched: phones
    phones                  text[]      NOT NULL DEFAULT '{}',
    phones_count            integer     GENERATED ALWAYS AS (cardinality(phones)) STORED,

    -- Enriched: WhatsApp
    whatsapp                text[]      NOT NULL DEFAULT '{}',
    whatsapp_count          integer     GENERATED ALWAYS AS (cardinality(whatsapp)) STORED,
    whatsapp_validated      jsonb       NOT NULL DEFAULT '{}'
                            CONSTRAINT zen_contacts_whatsapp_validated_check
                            CHECK (jsonb_typeof(whatsapp_validated) = 'object'),

    -- Enriched: social profiles
    facebook_url            text,
    instagram_url           text,
    linkedin_url            text,
    twitter_url             text,
    youtube_url             text,
    tiktok_url              text,

    -- Enriched: website crawl
    website_title           text,
    website_status_code     smallint
                            CONSTRAINT zen_contacts_website_status_code_check
                            CHECK (website_status_code BETWEEN 100 AND 599),
    website_language        text,
    contact_page_url        text,
    pages_crawled           integer
                            CONSTRAINT zen_contacts_pages_crawled_check CHECK (pages_crawled >= 0),

    -- Scrape bookkeeping
    scrape_status           text        NOT NULL DEFAULT 'pending'
                            CONSTRAINT zen_contacts_scrape_status_check
                            CHECK (scrape_status IN ('pending', 'success', 'partial', 'failed')),
    scrape_error            text,
    last_scrape_server      text,
    scrape_count            integer     NOT NULL DEFAULT 0
                            CONSTRAINT zen_contacts_scrape_count_check CHECK (scrape_count >= 0),
    -- Newest observation merged into the row (greatest of every write's observed_at).
    observed_at             timestamptz,
    -- When each merged scalar's current value was observed, epoch microseconds, one slot
    -- per column in zenpipe.upsert.SCALAR_COLUMNS order (NULL: never observed). The
    -- writer keeps, per column, the value of the newest observation, so the row does not
    -- depend on the order in which writes arrive (see docs/upserting.md).
    observed_us             bigint[]    NOT NULL DEFAULT '{}',
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),

    -- Generated flags for the partial indexes below
    has_email               boolean     GENERATED ALWAYS AS (cardinality(emails) > 0) STORED,
    has_phone               boolean     GENERATED ALWAYS AS
                                        (cardinality(phones) > 0 OR maps_phone IS NOT NULL) STORED,
    has_whatsapp            boolean     GENERATED ALWAYS AS (cardinality(whatsapp) > 0) STORED,

    CONSTRAINT zen_contacts_pkey PRIMARY KEY (id, partition_key),
    -- The upsert's conflict target; every unique index must include the partition key.
    CONSTRAINT zen_contacts_source_link_key UNIQUE (source_link, partition_key),
    CONSTRAINT zen_contacts_partition_key_check CHECK (partition_key = hashtext(source_link)),
    CONSTRAINT zen_contacts_source_link_check
        CHECK (source_link <> '' AND octet_length(source_link) <= 2048),
    CONSTRAINT zen_contacts_source_id_fkey FOREIGN KEY (source_id)
        REFERENCES results (id) ON DELETE SET NULL
) PARTITION BY HASH (partition_key);

CREATE TABLE zen_contacts_p0 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 0);
CREATE TABLE zen_contacts_p1 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 1);
CREATE TABLE zen_contacts_p2 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 2);
CREATE TABLE zen_contacts_p3 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 3);
CREATE TABLE zen_contacts_p4 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 4);
CREATE TABLE zen_contacts_p5 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 5);
CREATE TABLE zen_contacts_p6 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 6);
CREATE TABLE zen_contacts_p7 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 7);
CREATE TABLE zen_contacts_p8 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 8);
CREATE TABLE zen_contacts_p9 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 9);
CREATE TABLE zen_contacts_p10 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 10);
CREATE TABLE zen_contacts_p11 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 11);
CREATE TABLE zen_contacts_p12 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 12);
CREATE TABLE zen_contacts_p13 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 13);
CREATE TABLE zen_contacts_p14 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 14);
CREATE TABLE zen_contacts_p15 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 15);
CREATE TABLE zen_contacts_p16 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 16);
CREATE TABLE zen_contacts_p17 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 17);
CREATE TABLE zen_contacts_p18 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 18);
CREATE TABLE zen_contacts_p19 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 19);
CREATE TABLE zen_contacts_p20 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 20);
CREATE TABLE zen_contacts_p21 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 21);
CREATE TABLE zen_contacts_p22 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 22);
CREATE TABLE zen_contacts_p23 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 23);
CREATE TABLE zen_contacts_p24 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 24);
CREATE TABLE zen_contacts_p25 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 25);
CREATE TABLE zen_contacts_p26 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 26);
CREATE TABLE zen_contacts_p27 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 27);
CREATE TABLE zen_contacts_p28 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 28);
CREATE TABLE zen_contacts_p29 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 29);
CREATE TABLE zen_contacts_p30 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 30);
CREATE TABLE zen_contacts_p31 PARTITION OF zen_contacts FOR VALUES WITH (MODULUS 32, REMAINDER 31);

-- Indexes (each names the query it serves; see docs/schema.md).
-- WHERE country_code = $1
CREATE INDEX idx_zc_country ON zen_contacts (country_code);
-- WHERE business_category = $1
CREATE INDEX idx_zc_category ON zen_contacts (business_category);
-- WHERE country_code = $1 AND business_category = $2 (the export query)
CREATE INDEX idx_zc_country_category ON zen_contacts (country_code, business_category);
-- WHERE scrape_status = $1 (re-scrape queues)
CREATE INDEX idx_zc_status ON zen_contacts (scrape_status);
-- WHERE country_code = $1 AND scrape_status = $2 (per-country progress)
CREATE INDEX idx_zc_country_status ON zen_contacts (country_code, scrape_status);
-- WHERE source_link = $1 when the caller cannot compute partition_key (ad-hoc lookups)
CREATE INDEX idx_zc_link_hash ON zen_contacts USING hash (source_link);
-- ORDER BY updated_at DESC LIMIT n (recent changes, incremental exports)
CREATE INDEX idx_zc_updated ON zen_contacts (updated_at DESC);
-- WHERE has_email (export of contacts that have an email); partial: only those rows
CREATE INDEX idx_zc_has_email ON zen_contacts (country_code) WHERE has_email;
-- WHERE has_whatsapp (WhatsApp campaigns); partial
CREATE INDEX idx_zc_has_whatsapp ON zen_contacts (country_code) WHERE has_whatsapp;
-- WHERE last_scrape_server = $1 (per-server audits, bad-server cleanup)
CREATE INDEX idx_zc_server ON zen_contacts (last_scrape_server);

-- Partition key as a named SQL function, for SQL users and ad-hoc queries:
--   SELECT * FROM zen_contacts WHERE source_link = $1 AND partition_key = zen_partition_key_v1($1)
-- prunes to one partition.
CREATE FUNCTION zen_partition_key_v1(link text) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN hashtext(link);

-- Union of two text arrays as a sorted ("C" order), duplicate-free array: the result
-- does not depend on which array came first, so concurrent writers converge. Callers
-- send pre-deduplicated sorted arrays; the common re-upsert (nothing new) returns the
-- stored array untouched. IMMUTABLE and subquery-free at the call site, as Citus needs
-- inside ON CONFLICT DO UPDATE.
CREATE FUNCTION zen_array_union_v1(current_items text[], new_items text[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE
        WHEN new_items IS NULL OR cardinality(new_items) = 0 THEN coalesce(current_items, '{}')
        WHEN current_items IS NULL OR cardinality(current_items) = 0 THEN new_items
        WHEN current_items @> new_items THEN current_items
        ELSE ARRAY(SELECT DISTINCT u.item COLLATE "C"
                   FROM unnest(current_items || new_items) AS u(item)
                   ORDER BY 1)
    END;

-- Merge of one scalar column: the value of the newest observation wins, ties go to the
-- greater value, and NULL never erases. A value without an observation time (a column
-- default, a row written by another tool) counts as the oldest observation. This is
-- max() under (observed_us, value) order: commutative, associative and idempotent, so
-- concurrent writers converge whatever the order of their commits. IMMUTABLE and
-- subquery-free (Citus accepts it inside ON CONFLICT DO UPDATE); a plain SQL body so the
-- planner inlines it for each column type.
CREATE FUNCTION zen_pick_v1(cur_val anyelement, cur_us bigint, new_val anyelement, new_us bigint)
    RETURNS anyelement
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT CASE
            WHEN new_val IS NULL THEN cur_val
            WHEN cur_val IS NULL THEN new_val
            WHEN (new_us, new_val) > (coalesce(cur_us, -9223372036854775808), cur_val) THEN new_val
            ELSE cur_val
        END
    $$;

-- updated_at for writers that do not set it themselves. zenpipe's writer sets it in the
-- statement (Citus refuses triggers on distributed tables), so the WHEN clause skips the
-- function call entirely on its hot path.
CREATE FUNCTION zen_touch_updated_at_v1() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER zen_contacts_touch_updated_at
    BEFORE UPDATE ON zen_contacts
    FOR EACH ROW
    WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION zen_touch_updated_at_v1();
