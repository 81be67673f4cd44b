"""SQL functions that merge DDSketch protobuf sketches and read a quantile (contract 12.5),
created by ``migrate`` in plain SQL and PL/pgSQL, so no extension is needed.

* ``vabus_quantile(sketches bytea[], q float8) float8``: the ``q`` quantile of all the
  values of these sketches (NULL elements are skipped; NULL when they hold no value), by
  the ddsketch library's rule: the bin that holds rank ``q * (count - 1)``, reported as
  ``2 * gamma**key / (1 + gamma)``. Within 1 % of the exact value of that rank.
* ``vabus_sketch_merge(sketches bytea[]) bytea``: one sketch of all of them (a
  DDSketch message with contiguous bins), for rollups: merging is exact, so
  ``vabus_quantile(ARRAY[vabus_sketch_merge(a)], q) = vabus_quantile(a, q)``.
* ``vabus_sketch_bins(sketch bytea)``: the decoded message, one row per bin (``sign``
  1 positive, -1 negative, 0 the zero count), for inspection.

Sketches of another ``gamma``, index offset or interpolation than the others in one call
are refused (SQLSTATE 22023) rather than mixed: their keys mean other values. The
decoder reads the whole ``ddsketch.proto`` wire format (varints, zigzag ``sint32``,
packed and unpacked doubles, the ``binCounts`` map and the contiguous bins, repeated
and merged sub-messages, unknown fields skipped) and refuses anything malformed.

Every statement is ``CREATE OR REPLACE``: ``migrate`` stays idempotent. The functions
are created in the first schema of the ``search_path`` of the migrating user.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SKETCH_FUNCTIONS", "sketch_function_ddl"]

SKETCH_FUNCTIONS: Final = ("vabus_quantile", "vabus_sketch_merge", "vabus_sketch_bins")

# Raises. STABLE, not IMMUTABLE: the planner folds an immutable call with constant
# arguments, even in a CASE branch that is never taken, and would raise at plan time.
_FAIL: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_fail(message text) RETURNS float8
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RAISE EXCEPTION '%', message USING ERRCODE = '22023';
END $$"""


def _read_varint(target: str, keep_below: int, fail_at: int, what: str) -> str:
    """PL/pgSQL that reads the varint at ``pos`` into ``target``: its bits below
    ``keep_below`` are kept (the rest cannot matter for a tag or a length), and it is
    refused as malformed ``what`` when it runs past the message or ``fail_at`` bits."""
    return f"""{target} := 0; shift := 0;
        LOOP
            IF pos >= size OR shift >= {fail_at} THEN
                PERFORM vabus_sketch_fail('malformed DDSketch: {what}');
            END IF;
            b := get_byte(msg, pos); pos := pos + 1;
            IF shift < {keep_below} THEN
                {target} := {target} | ((b & 127)::bigint << shift);
            END IF;
            shift := shift + 7;
            EXIT WHEN b < 128;
        END LOOP;"""


# A protobuf message's fields in wire order: for varints ``ival`` (the low 63 bits), for
# 64-bit fields ``dval`` (a little-endian IEEE 754 double), for length-delimited ones
# ``sub``. 32-bit fields are skipped (ddsketch.proto has none), groups refused. A tag or
# a length takes at most 5 bytes (35 bits), a varint 10.
_FIELDS: Final = f"""
CREATE OR REPLACE FUNCTION vabus_sketch_fields(msg bytea)
RETURNS TABLE (ord integer, field integer, wire integer, ival bigint, dval float8, sub bytea)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    pos integer := 0;
    size integer := length(msg);
    b integer;
    shift integer;
    v bigint;
    tag bigint;
    n integer := 0;
BEGIN
    WHILE pos < size LOOP
        {_read_varint("tag", 35, 35, "bad field tag")}
        n := n + 1; ord := n; field := (tag >> 3)::integer; wire := (tag & 7)::integer;
        ival := NULL; dval := NULL; sub := NULL;
        IF wire = 0 THEN
            {_read_varint("v", 63, 70, "bad varint")}
            ival := v;
        ELSIF wire = 1 THEN
            IF pos + 8 > size THEN
                PERFORM vabus_sketch_fail('malformed DDSketch: truncated double');
            END IF;
            dval := vabus_sketch_double(msg, pos); pos := pos + 8;
        ELSIF wire = 2 THEN
            {_read_varint("v", 35, 35, "bad length")}
            IF pos + v > size THEN
                PERFORM vabus_sketch_fail('malformed DDSketch: truncated field');
            END IF;
            sub := substring(msg FROM pos + 1 FOR v::integer); pos := pos + v::integer;
        ELSIF wire = 5 THEN
            IF pos + 4 > size THEN
                PERFORM vabus_sketch_fail('malformed DDSketch: truncated fixed32');
            END IF;
            pos := pos + 4;
        ELSE
            PERFORM vabus_sketch_fail(format('malformed DDSketch: wire type %s', wire));
        END IF;
        RETURN NEXT;
    END LOOP;
END $$"""

# The IEEE 754 double in the 8 little-endian bytes at ``pos``; exact (the significand is
# an integer below 2**53, scaled by a power of two; a subnormal's exponent is that of 1).
# One expression of ``b`` and ``pos`` only, without FROM, not STRICT (a CASE is not
# strict) and STABLE like vabus_sketch_fail, so that PostgreSQL inlines it into the
# decoding query: ~6x faster than a function call per bin. Parenthesised throughout:
# SQL gives | and << one precedence.
_DOUBLE: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_double(b bytea, pos integer) RETURNS float8
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN (get_byte(b, pos + 7) & 127) = 127 AND get_byte(b, pos + 6) >= 240
            THEN vabus_sketch_fail('DDSketch holds a NaN or an infinity at byte ' || pos::text)
        ELSE CASE WHEN get_byte(b, pos + 7) >= 128 THEN -1::float8 ELSE 1::float8 END
            * (((get_byte(b, pos + 6) & 15)::bigint << 48) | (get_byte(b, pos + 5)::bigint << 40)
               | (get_byte(b, pos + 4)::bigint << 32) | (get_byte(b, pos + 3)::bigint << 24)
               | (get_byte(b, pos + 2)::bigint << 16) | (get_byte(b, pos + 1)::bigint << 8)
               | get_byte(b, pos)::bigint
               + CASE WHEN (get_byte(b, pos + 7) & 127) = 0 AND get_byte(b, pos + 6) < 16
                      THEN 0 ELSE 4503599627370496 END)::float8
            * power(2::float8, greatest(((get_byte(b, pos + 7) & 127) << 4)
                                        | (get_byte(b, pos + 6) >> 4), 1) - 1075)
    END
$$"""

# One sketch's bins. Repeated occurrences of a sub-message merge, as protobuf defines it,
# by concatenating their bytes. Zigzag: (n >> 1) xor -(n & 1). A store's bins are its
# map entries (the last value of a key wins) plus its contiguous counts (packed or not).
_BINS: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_bins(sketch bytea)
RETURNS TABLE (gamma float8, index_offset float8, interpolation bigint,
               sign integer, key integer, n float8)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
WITH top AS MATERIALIZED (SELECT * FROM vabus_sketch_fields(sketch)),
mapping AS (  -- the last value of a field wins, as protobuf defines it
    SELECT coalesce((array_agg(f.dval ORDER BY f.ord DESC)
                     FILTER (WHERE f.field = 1 AND f.wire = 1))[1], 0) AS gamma,
           coalesce((array_agg(f.dval ORDER BY f.ord DESC)
                     FILTER (WHERE f.field = 2 AND f.wire = 1))[1], 0) AS index_offset,
           coalesce((array_agg(f.ival ORDER BY f.ord DESC)
                     FILTER (WHERE f.field = 3 AND f.wire = 0))[1], 0) AS interpolation
    FROM (SELECT coalesce(string_agg(sub, ''::bytea ORDER BY ord), ''::bytea) AS b
          FROM top WHERE field = 1 AND wire = 2) AS m
         LEFT JOIN LATERAL vabus_sketch_fields(m.b) AS f ON true
),
stores AS (
    SELECT CASE WHEN field = 2 THEN 1 ELSE -1 END AS sign,
           string_agg(sub, ''::bytea ORDER BY ord) AS b
    FROM top WHERE field IN (2, 3) AND wire = 2 GROUP BY field
),
store_fields AS (
    SELECT s.sign, f.* FROM stores s, LATERAL vabus_sketch_fields(s.b) f
),
offsets AS (
    SELECT DISTINCT ON (sign) sign, ((ival >> 1) # -(ival & 1))::integer AS first_key
    FROM store_fields WHERE field = 3 AND wire = 0 ORDER BY sign, ord DESC
),
contiguous AS (  -- packed (wire 2) and unpacked (wire 1) counts, in wire order
    SELECT sign, ord, 0 AS i, dval AS n FROM store_fields WHERE field = 2 AND wire = 1
    UNION ALL
    SELECT sign, ord, i, vabus_sketch_double(sub, 8 * i) AS n
    FROM store_fields, generate_series(0, length(sub) / 8 - 1) AS i
    WHERE CASE  -- one condition: the check must not run on rows of other fields
        WHEN field <> 2 OR wire <> 2 THEN false
        WHEN length(sub) % 8 = 0 THEN true
        ELSE vabus_sketch_fail('malformed DDSketch: packed length ' || length(sub)::text) = 0
    END
),
entries AS (
    SELECT DISTINCT ON (sf.sign, e.key) sf.sign, e.key, e.n
    FROM store_fields sf,
         LATERAL (SELECT (SELECT ((f.ival >> 1) # -(f.ival & 1))::integer
                          FROM vabus_sketch_fields(sf.sub) f
                          WHERE f.field = 1 AND f.wire = 0 ORDER BY f.ord DESC LIMIT 1) AS key,
                         (SELECT f.dval FROM vabus_sketch_fields(sf.sub) f
                          WHERE f.field = 2 AND f.wire = 1 ORDER BY f.ord DESC LIMIT 1) AS n) e
    WHERE sf.field = 1 AND sf.wire = 2
    ORDER BY sf.sign, e.key, sf.ord DESC
),
bins AS (
    SELECT c.sign, coalesce(o.first_key, 0)
                   + (row_number() OVER (PARTITION BY c.sign ORDER BY c.ord, c.i))::integer - 1
                   AS key, c.n
    FROM contiguous c LEFT JOIN offsets o USING (sign)
    UNION ALL
    SELECT sign, coalesce(key, 0), coalesce(n, 0) FROM entries
    UNION ALL
    SELECT 0, 0, coalesce((SELECT dval FROM top WHERE field = 4 AND wire = 1
                           ORDER BY ord DESC LIMIT 1), 0)
)
SELECT m.gamma, m.index_offset, m.interpolation, b.sign, b.key, b.n
FROM mapping m, bins b
WHERE b.n <> 0 OR b.sign = 0
$$"""

# The bins of many sketches summed per key, after checking they share one mapping.
_CHECK: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_check(g float8[], o float8[], i bigint[])
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF g IS NULL THEN
        RETURN true;
    END IF;
    IF cardinality(i) > 1 OR i[1] <> 0 THEN
        RAISE EXCEPTION 'DDSketch interpolation % is not supported', i
            USING ERRCODE = '22023',
                  HINT = 'VaBus writes the logarithmic mapping (interpolation NONE = 0)';
    END IF;
    IF cardinality(g) > 1 OR cardinality(o) > 1 THEN
        RAISE EXCEPTION 'cannot merge DDSketches of different mappings: gamma %, index offset %',
            g, o
            USING ERRCODE = '22023',
                  HINT = 'VaBus writes gamma 1.0202020202020203 (relative accuracy 0.01) '
                         'and offset 0; select rows of one relative accuracy';
    END IF;
    IF NOT g[1] > 1 THEN
        RAISE EXCEPTION 'DDSketch gamma % is not above 1 (no mapping?)', g[1]
            USING ERRCODE = '22023';
    END IF;
    RETURN true;
END $$"""

_MERGED_BINS: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_merged_bins(sketches bytea[])
RETURNS TABLE (gamma float8, index_offset float8, sign integer, key integer, n float8)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
WITH bins AS MATERIALIZED (
    SELECT b.* FROM unnest(sketches) AS s, LATERAL vabus_sketch_bins(s) AS b
    WHERE s IS NOT NULL
),
mappings AS MATERIALIZED (
    SELECT array_agg(DISTINCT b.gamma) AS g, array_agg(DISTINCT b.index_offset) AS o,
           array_agg(DISTINCT b.interpolation) AS i
    FROM bins b
),
checked AS MATERIALIZED (SELECT vabus_sketch_check(g, o, i) AS ok, g, o FROM mappings)
SELECT c.g[1], c.o[1], b.sign, b.key, sum(b.n)
FROM bins b, checked c
WHERE c.ok
GROUP BY c.g[1], c.o[1], b.sign, b.key
$$"""

# The library's mapping, rebuilt from gamma as ``LogarithmicMapping.from_gamma_offset``
# does: alpha = (g - 1) / (g + 1), g' = 1 + 2 alpha / (1 - alpha), value(key) =
# 2 ** ((key - offset) * log1p(g' - 1) / ln 2) * 2 / (1 + g'); log1p(x) as
# ln(1 + x) * x / ((1 + x) - 1), accurate where ln(1 + x) alone is not.
_VALUE: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_value(gamma float8, index_offset float8, key integer)
RETURNS float8
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE
        WHEN x < -1074 THEN 0  -- below every double: such a key holds no value
        WHEN x < 1020 THEN power(2::float8, x) * r
        WHEN power(2::float8, x - 8) * r < 1.7976931348623157e308 / 256
            THEN power(2::float8, x - 8) * r * 256
        ELSE 1.7976931348623157e308
    END
    FROM (SELECT (key - index_offset) * ln(u) * gm / (u - 1) / ln(2::float8) AS x,
                 2 / (1 + (1 + gm)) AS r
          FROM (SELECT gm, 1 + gm AS u
                FROM (SELECT 2 * a / (1 - a) AS gm
                      FROM (SELECT (gamma - 1) / (gamma + 1) AS a) AS alpha) AS mantissa)
               AS base) AS exponent
$$"""

_QUANTILE: Final = r"""
CREATE OR REPLACE FUNCTION vabus_quantile(sketches bytea[], q float8) RETURNS float8
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    g float8;
    o float8;
    keys integer[];
    counts float8[];
    signs integer[];
    negative float8 := 0;
    zero float8 := 0;
    total float8 := 0;
    rank float8;
    running float8 := 0;
    k integer;
BEGIN
    IF q IS NULL OR NOT (q >= 0 AND q <= 1) THEN
        RAISE EXCEPTION 'vabus_quantile: q must be between 0 and 1, got %', q
            USING ERRCODE = '22023';
    END IF;
    IF sketches IS NULL THEN
        RETURN NULL;
    END IF;
    -- negative bins by increasing magnitude, then the zero count, then positive bins
    SELECT min(m.gamma), min(m.index_offset),
           array_agg(m.sign ORDER BY m.sign, m.key), array_agg(m.key ORDER BY m.sign, m.key),
           array_agg(m.n ORDER BY m.sign, m.key)
        INTO g, o, signs, keys, counts
        FROM vabus_sketch_merged_bins(sketches) m WHERE m.n <> 0;
    IF signs IS NULL THEN
        RETURN NULL;
    END IF;
    FOR k IN 1 .. cardinality(signs) LOOP
        total := total + counts[k];
        IF signs[k] = -1 THEN negative := negative + counts[k];
        ELSIF signs[k] = 0 THEN zero := zero + counts[k];
        END IF;
    END LOOP;
    rank := q * (total - 1);
    IF rank < negative THEN  -- the library's key_at_rank(negative - rank - 1, lower=False)
        FOR k IN 1 .. cardinality(signs) LOOP
            running := running + counts[k];
            IF running >= negative - rank THEN
                RETURN -vabus_sketch_value(g, o, keys[k]);
            END IF;
        END LOOP;
    END IF;
    IF rank < negative + zero THEN
        RETURN 0;
    END IF;
    rank := rank - negative - zero;
    FOR k IN 1 .. cardinality(signs) LOOP
        IF signs[k] = 1 THEN
            running := running + counts[k];
            IF running > rank THEN
                RETURN vabus_sketch_value(g, o, keys[k]);
            END IF;
        END IF;
    END LOOP;
    RETURN vabus_sketch_value(g, o, keys[cardinality(keys)]);
END $$"""

# The encoders of vabus_sketch_merge: a varint, a zigzag sint32, a double (exact: the
# exponent found from the logarithm is corrected, the significand is a scaled integer).
_VARINT: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_varint(v bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    out bytea := ''::bytea;
BEGIN
    LOOP
        IF v < 128 THEN
            RETURN out || set_byte('\x00'::bytea, 0, v::integer);
        END IF;
        out := out || set_byte('\x00'::bytea, 0, ((v & 127) | 128)::integer);
        v := v >> 7;
    END LOOP;
END $$"""

_DOUBLE_BYTES: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_double_bytes(v float8) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    a float8 := abs(v);
    e integer;
    m bigint;
    biased integer;
    hi bigint;
    lo bigint;
    out bytea := '\x0000000000000000'::bytea;
BEGIN
    IF a = 0 THEN
        RETURN out;
    END IF;
    IF a < power(2::float8, -1022) THEN
        biased := 0;
        m := (a * power(2::float8, 1022) * power(2::float8, 52))::bigint;  -- 2**1074 overflows
    ELSE
        -- the logarithm may be one off near powers of two (2**1024 would overflow)
        e := least(1023, floor(ln(a) / ln(2::float8))::integer);
        WHILE e > -1022 AND power(2::float8, e) > a LOOP e := e - 1; END LOOP;
        WHILE e < 1023 AND power(2::float8, e + 1) <= a LOOP e := e + 1; END LOOP;
        biased := e + 1023;
        m := ((a / power(2::float8, e) - 1) * 4503599627370496)::bigint;
    END IF;
    hi := (CASE WHEN v < 0 THEN 2147483648 ELSE 0 END) | (biased::bigint << 20) | (m >> 32);
    lo := m & 4294967295;
    FOR k IN 0 .. 3 LOOP
        out := set_byte(out, k, ((lo >> (8 * k)) & 255)::integer);
        out := set_byte(out, k + 4, ((hi >> (8 * k)) & 255)::integer);
    END LOOP;
    RETURN out;
END $$"""

# One DDSketch message of the merged bins, with the fields where the library writes
# them: mapping (gamma, a non-zero offset), the two stores as contiguous packed counts
# (zeros between bins, the offset as zigzag sint32 when not 0), a non-zero zero count.
_MERGE: Final = r"""
CREATE OR REPLACE FUNCTION vabus_sketch_merge(sketches bytea[]) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    g float8;
    o float8;
    signs integer[];
    keys integer[];
    counts float8[];
    dense float8[];
    zero float8 := 0;
    mapping bytea;
    store bytea;
    packed bytea;
    out bytea;
    s integer;
    k integer;
    first_key integer;
BEGIN
    SELECT min(m.gamma), min(m.index_offset),
           array_agg(m.sign ORDER BY m.sign, m.key), array_agg(m.key ORDER BY m.sign, m.key),
           array_agg(m.n ORDER BY m.sign, m.key)
        INTO g, o, signs, keys, counts
        FROM vabus_sketch_merged_bins(sketches) m;
    IF g IS NULL THEN
        RETURN NULL;
    END IF;
    mapping := '\x09'::bytea || vabus_sketch_double_bytes(g);
    IF o <> 0 THEN
        mapping := mapping || '\x11'::bytea || vabus_sketch_double_bytes(o);
    END IF;
    out := '\x0a'::bytea || vabus_sketch_varint(length(mapping)) || mapping;
    FOREACH s IN ARRAY ARRAY[1, -1] LOOP
        dense := ARRAY[]::float8[];
        first_key := NULL;
        FOR k IN 1 .. cardinality(signs) LOOP
            IF signs[k] = 0 THEN
                zero := counts[k];
            ELSIF signs[k] = s AND counts[k] <> 0 THEN
                IF first_key IS NULL THEN
                    first_key := keys[k];
                END IF;
                WHILE first_key + cardinality(dense) < keys[k] LOOP
                    dense := dense || 0::float8;
                END LOOP;
                dense := dense || counts[k];
            END IF;
        END LOOP;
        store := ''::bytea;
        IF first_key IS NOT NULL THEN
            SELECT string_agg(vabus_sketch_double_bytes(d.x), ''::bytea ORDER BY d.ord)
                INTO packed FROM unnest(dense) WITH ORDINALITY AS d(x, ord);
            store := '\x12'::bytea || vabus_sketch_varint(length(packed)) || packed;
            IF first_key <> 0 THEN
                store := store || '\x18'::bytea
                    || vabus_sketch_varint((first_key::bigint << 1) # (first_key::bigint >> 63));
            END IF;
        END IF;
        out := out || (CASE WHEN s = 1 THEN '\x12' ELSE '\x1a' END)::bytea
                   || vabus_sketch_varint(length(store)) || store;
    END LOOP;
    IF zero <> 0 THEN
        out := out || '\x21'::bytea || vabus_sketch_double_bytes(zero);
    END IF;
    RETURN out;
END $$"""


def sketch_function_ddl() -> list[str]:
    """The statements that create (or replace) the sketch functions, in dependency order."""
    return [
        _FAIL,
        _DOUBLE,
        _FIELDS,
        _BINS,
        _CHECK,
        _MERGED_BINS,
        _VALUE,
        _QUANTILE,
        _VARINT,
        _DOUBLE_BYTES,
        _MERGE,
    ]
