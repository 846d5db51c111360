-- place_in_line goes.
--
-- take_places_in_line (20261207000001) replaced it; it stayed one version
-- for the instances of that earlier version still running while an upgrade
-- rolled out. No version since calls it.
--
-- An instance older than 20261207000001 still running against this schema
-- fails its enqueues with "function place_in_line(...) does not exist";
-- finish rolling out the version before this one first.

DROP FUNCTION place_in_line(text[], text[], int[], float8);
