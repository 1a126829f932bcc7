//! Bad input gets one clear error naming the file and field.
