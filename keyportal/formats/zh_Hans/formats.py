"""Simplified Chinese formats for the portal (FORMAT_MODULE_PATH).

Django's own zh_Hans formats write `2026年11月23日` and group numbers by ten thousand with no
separator (`4220812`); the portal's tables read ISO-like dates and `4,220,812`, as Chinese
developer tools (and the English pages) do, so a number reads the same in both languages."""

DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i"
DATETIME_FORMAT = "Y-m-d H:i"
SHORT_DATE_FORMAT = "Y-m-d"
SHORT_DATETIME_FORMAT = "Y-m-d H:i"
YEAR_MONTH_FORMAT = "Y年n月"
MONTH_DAY_FORMAT = "n月j日"
DECIMAL_SEPARATOR = "."
THOUSAND_SEPARATOR = ","
NUMBER_GROUPING = 3
