"""Entries the database refuses for a reason other than being unavailable, as the delivery-budget
tests (in process, end to end and under faults) make them: bad input whose dead letter cannot be
stored whole, and triggers that refuse chosen events or their dead letters."""

# Under 200 bytes, and bad input: its unknown field's name is 26 NULs, which the dead letter
# names, escaped, in dead_letters.field (VARCHAR(100)): 26 * len("\\x00") = 104 characters.
NUL_FIELD_ENTRY = '{"type":"fx_rate","' + "\\u0000" * 26 + '":1}'

# A trigger that refuses one event for a reason that is neither the database being unavailable
# nor a data error (SQLSTATE P0001, raise_exception): the class of a bug or a forgotten rule.
REFUSE_POISON = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.event_id LIKE 'poison%' THEN
        RAISE EXCEPTION 'refused by a trigger: %', NEW.event_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON fx_rates
    FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""

# And one that refuses its dead letter too: then only the quarantine file is left.
REFUSE_POISON_DEAD_LETTER = """
CREATE FUNCTION refuse_poison_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payload LIKE '%poison%' THEN
        RAISE EXCEPTION 'dead letter refused by a trigger';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison_dead_letter BEFORE INSERT ON dead_letters
    FOR EACH ROW EXECUTE FUNCTION refuse_poison_dead_letter();
"""
