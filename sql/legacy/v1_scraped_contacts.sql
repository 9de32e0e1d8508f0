-- The V1 table of the audit's fleet (create_table.sql): one flat row per scrape, not
-- partitioned, no unique link (re-scrapes of a link are separate rows), the lists kept
-- as comma-separated text. This is the shape `zenpipe migrate-legacy --from v1` reads;
-- tests create it from this file. Columns the audit lists: name, category, website,
-- country, city, address, lat/lng, rating, reviews, phone, emails, phones, WhatsApp,
-- socials, link.
CREATE TABLE IF NOT EXISTS scraped_contacts (
    id          bigserial PRIMARY KEY,
    name        text,
    category    text,
    website     text,
    country     text,             -- ISO 3166-1 alpha-2, any case
    city        text,
    address     text,
    lat         double precision,
    lng         double precision,
    rating      real,
    reviews     integer,
    phone       text,             -- the Google Maps phone
    emails      text,             -- 'a@x.com, b@y.com'
    phones      text,             -- comma-separated
    whatsapp    text,             -- comma-separated
    facebook    text,
    instagram   text,
    linkedin    text,
    twitter     text,
    youtube     text,
    tiktok      text,
    link        text,             -- the Google Maps link: the contact's identity
    scraped_at  timestamptz NOT NULL DEFAULT now()
);
