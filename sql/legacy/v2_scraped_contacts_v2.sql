-- The V2 table of the audit's fleet (001_partitioned_schema.sql): hash-partitioned by
-- abs(hashtext(link)) % 32 (the audit's key, which overflows on INT_MIN: V2 could not
-- store such a link), arrays for the lists, socials in one jsonb object, unique per link.
-- This is the shape `zenpipe migrate-legacy --from v2` reads; tests create it from this
-- file (4 partitions here; the migration reads the parent, whatever the partitions).
CREATE TABLE IF NOT EXISTS scraped_contacts_v2 (
    id                bigserial,
    partition_key     integer NOT NULL,
    source_link       text    NOT NULL,
    business_name     text,
    business_category text,
    website           text,
    country_code      text,
    city              text,
    address           text,
    latitude          double precision,
    longitude         double precision,
    rating            numeric(2, 1),
    reviews_count     integer,
    maps_phone        text,
    emails            text[],
    phones            text[],
    whatsapp          text[],
    socials           jsonb,        -- {"facebook": url, "instagram": url, ...}
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, partition_key),
    UNIQUE (source_link, partition_key)
) PARTITION BY HASH (partition_key);
CREATE TABLE IF NOT EXISTS scraped_contacts_v2_p0 PARTITION OF scraped_contacts_v2
    FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE IF NOT EXISTS scraped_contacts_v2_p1 PARTITION OF scraped_contacts_v2
    FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE IF NOT EXISTS scraped_contacts_v2_p2 PARTITION OF scraped_contacts_v2
    FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE IF NOT EXISTS scraped_contacts_v2_p3 PARTITION OF scraped_contacts_v2
    FOR VALUES WITH (MODULUS 4, REMAINDER 3);
-- Keyset reads in id order across the partitions.
CREATE INDEX IF NOT EXISTS scraped_contacts_v2_id_idx ON scraped_contacts_v2 (id);
