"""English formats for the portal (FORMAT_MODULE_PATH): dates in tables read the same in every
language, `2026-11-23 22:32` (never `11/23/2026 10:32 p.m.`); numbers group by thousands."""

DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i"
DATETIME_FORMAT = "Y-m-d H:i"
SHORT_DATE_FORMAT = "Y-m-d"
SHORT_DATETIME_FORMAT = "Y-m-d H:i"
DECIMAL_SEPARATOR = "."
THOUSAND_SEPARATOR = ","
NUMBER_GROUPING = 3
